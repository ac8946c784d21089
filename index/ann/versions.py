"""Versioned index directories and atomic publish (DESIGN.md, "Index on disk").

Layout::

    <root>/<name>/<version>/manifest.json       what was built, sha256 of every file
    <root>/<name>/<version>/shard-NNN.faiss      one FAISS index per shard (int64 ids)
    <root>/<name>/<version>/shard-NNN.ids.parquet  id -> item_id / image_id
    <root>/<name>/CURRENT                        the published version's name

Safety rules, in order: a version directory is written under a temporary name (``.tmp-...``) and
renamed complete; only then may CURRENT name it; CURRENT is replaced by writing a temporary file
and ``os.replace``-ing it (atomic on POSIX), so a reader sees the old or the new name, never a
half-written one. Readers hold their own file handles / loaded indexes, so publishing, rolling
back or even pruning the version they opened does not disturb them. Local filesystems only:
object stores have no atomic rename.

Publish, roll back and prune take the index's lock (``flock`` on ``<root>/<name>/.index.lock``):
without it a prune that read the old CURRENT could delete the version a concurrent publish is
about to name (a slow fsync on a shared mount widens that window to seconds). Small files
(CURRENT, manifest.json) are read with a size cap and only when they are regular files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
INDEX_LOCK = ".index.lock"
FORMAT = 1
MAX_CURRENT_BYTES = 256  # a version name and a newline
MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists a few files per shard; far below this
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")


class IndexVersionError(ValueError):
    """Missing, incomplete, tampered or unknown index version."""


def shard_files(shard: int) -> tuple[str, str]:
    """File names of shard `shard`: (FAISS index, ids Parquet)."""
    return f"shard-{shard:03d}.faiss", f"shard-{shard:03d}.ids.parquet"


def new_version_name() -> str:
    """A sortable, unique version name: UTC timestamp to the microsecond + random suffix."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_small_file(path: str, limit: int, what: str, error=IndexVersionError) -> bytes:
    """The bytes of a small regular file, at most `limit` of them; `error` (one line, never the
    file's content) for a directory, device, FIFO or a larger file. FileNotFoundError passes."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {what} is not a regular file")
        if st.st_size > limit:
            raise error(f"{path}: {what} is {st.st_size} bytes, more than the {limit} allowed")
        data = os.read(fd, limit + 1)
        if len(data) > limit:  # grew while we read it
            raise error(f"{path}: {what} is larger than the {limit} bytes allowed")
        return data
    finally:
        os.close(fd)


def _local(path: str) -> str:
    path = str(path)
    if "://" in path and not path.startswith("file://"):
        raise IndexVersionError(f"{path}: indexes are published on a local/mounted filesystem only "
                                "(atomic rename is needed); mount the bucket or copy the version")
    return os.path.abspath(path.removeprefix("file://"))


def _check_version_name(version: str) -> str:
    v = version or ""
    if not _VERSION_RE.match(v) or len(v) > MAX_CURRENT_BYTES - 1:
        # at most 60 characters shown: never echo a whole file given as a version name
        shown = repr(v[:60]) + ("..." if len(v) > 60 else "")
        raise IndexVersionError(f"invalid version name {shown}")
    return version


@dataclass(frozen=True)
class IndexHome:
    """``<root>/<name>``: the directory that holds an index's versions and its CURRENT file."""

    path: str

    @classmethod
    def of(cls, root: str, name: str) -> IndexHome:
        return cls(os.path.join(_local(root), name))

    def __post_init__(self):
        object.__setattr__(self, "path", _local(self.path))

    def version_dir(self, version: str) -> str:
        return os.path.join(self.path, _check_version_name(version))

    @property
    def current_file(self) -> str:
        return os.path.join(self.path, CURRENT)

    def current(self) -> str | None:
        """The published version's name, or None if nothing was published yet."""
        try:
            data = read_small_file(self.current_file, MAX_CURRENT_BYTES, CURRENT)
        except FileNotFoundError:
            return None
        try:
            name = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise IndexVersionError(f"{self.current_file}: {CURRENT} does not hold a version name") from None
        if not _VERSION_RE.match(name):
            raise IndexVersionError(f"{self.current_file}: {CURRENT} does not hold a version name")
        return name

    def list_versions(self) -> list[str]:
        """Complete versions (renamed into place, with a manifest), oldest first (by the
        manifest's created_at, then name)."""
        if not os.path.isdir(self.path):
            return []
        keyed = []
        for entry in os.listdir(self.path):
            if entry.startswith(".") or entry in (CURRENT, INDEX_LOCK):
                continue
            if os.path.isfile(os.path.join(self.path, entry, MANIFEST)):
                try:
                    created = str(self.manifest(entry).get("created_at", ""))
                except IndexVersionError:
                    continue  # being pruned / unreadable: not a usable version
                keyed.append((created, entry))
        return [v for _, v in sorted(keyed)]

    def manifest(self, version: str | None = None) -> dict:
        """The manifest of `version` (default: the CURRENT one)."""
        version = version or self.require_current()
        path = os.path.join(self.version_dir(version), MANIFEST)
        try:
            man = json.loads(read_small_file(path, MAX_MANIFEST_BYTES, MANIFEST))
        except (FileNotFoundError, NotADirectoryError):
            raise IndexVersionError(f"{self.path}: version {version} does not exist or is incomplete") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexVersionError(f"{path}: unreadable manifest: {e}") from None
        if not isinstance(man, dict):
            raise IndexVersionError(f"{path}: unreadable manifest: not a JSON object")
        return man

    def require_current(self) -> str:
        v = self.current()
        if v is None:
            raise IndexVersionError(f"{self.path}: no published version (no {CURRENT} file)")
        return v

    # ---- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def new_version(self, version: str | None = None) -> Iterator[tuple[str, str]]:
        """Yield (version name, temporary directory) to write a version's files into.

        On success the caller must have written ``manifest.json`` (see `finalize_manifest`);
        the directory is then renamed to its final name. On error it is removed. CURRENT is
        untouched: call `publish` afterwards.
        """
        version = _check_version_name(version or new_version_name())
        final = self.version_dir(version)
        if os.path.exists(final):
            raise IndexVersionError(f"{final}: version already exists")
        os.makedirs(self.path, exist_ok=True)
        tmp = os.path.join(self.path, f".tmp-{version}-{uuid.uuid4().hex[:6]}")
        os.makedirs(tmp)
        try:
            yield version, tmp
            if not os.path.isfile(os.path.join(tmp, MANIFEST)):
                raise IndexVersionError(f"{tmp}: no {MANIFEST} written; version not completed")
            _fsync_dir(tmp)
            os.rename(tmp, final)  # a version appears complete or not at all
            _fsync_dir(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The index's lock, held by publish, rollback and prune (blocking ``flock``; the kernel
        drops it when the holder dies, so it is never stale). Not re-entrant."""
        import fcntl

        os.makedirs(self.path, exist_ok=True)
        fd = os.open(os.path.join(self.path, INDEX_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def publish(self, version: str) -> None:
        """Point CURRENT at `version` atomically (it must be complete and renamed into place)."""
        with self.lock():
            self._publish_locked(version)

    def _publish_locked(self, version: str) -> None:
        self.manifest(version)  # raises if missing / incomplete (checked under the lock: no prune races it)
        tmp = os.path.join(self.path, f".tmp-{CURRENT}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.current_file)
        _fsync_dir(self.path)

    def rollback(self, to: str | None = None) -> str:
        """Publish `to`, or by default the newest version older than CURRENT. Returns it."""
        with self.lock():
            return self._rollback_locked(to)

    def _rollback_locked(self, to: str | None) -> str:
        versions = self.list_versions()
        if to is None:
            cur = self.require_current()
            older = versions[: versions.index(cur)] if cur in versions else []
            if not older:
                raise IndexVersionError(f"{self.path}: no version older than {cur} to roll back to")
            to = older[-1]
        elif to not in versions:
            raise IndexVersionError(f"{self.path}: unknown version {to!r} (have: {', '.join(versions) or 'none'})")
        self._publish_locked(to)
        return to

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions, never the CURRENT one, plus stale temp dirs
        older than an hour. Returns the deleted versions. Readers that already opened a deleted
        version keep working (open files / mmaps stay valid on POSIX)."""
        if keep < 1:
            raise IndexVersionError(f"prune: keep must be >= 1, got {keep}")
        with self.lock():  # CURRENT cannot change under us: what it names is never deleted
            return self._prune_locked(keep)

    def _prune_locked(self, keep: int) -> list[str]:
        versions = self.list_versions()
        cur = self.current()
        kept = set(versions[-keep:]) | {cur}
        deleted = []
        for v in versions:
            if v in kept:
                continue
            # rename aside first so a concurrent open sees "gone", not a half-deleted directory
            aside = os.path.join(self.path, f".tmp-del-{v}-{uuid.uuid4().hex[:6]}")
            os.rename(self.version_dir(v), aside)
            shutil.rmtree(aside, ignore_errors=True)
            deleted.append(v)
        for entry in os.listdir(self.path):
            p = os.path.join(self.path, entry)
            if entry.startswith(".tmp-") and time.time() - os.path.getmtime(p) > 3600:
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        return deleted

    def verify(self, version: str | None = None) -> dict:
        """Check the sha256 of every file listed in the manifest; raise IndexVersionError on a
        missing, extra-size or tampered file. Returns the manifest."""
        version = version or self.require_current()
        man = self.manifest(version)
        verify_files(self.version_dir(version), man)
        return man


def verify_files(vdir: str, manifest: dict, names: list[str] | None = None) -> None:
    """Check sha256 (and size) of `names` (default all) listed in `manifest` under `vdir`."""
    files = manifest.get("files") or {}
    for name in names if names is not None else sorted(files):
        entry = files.get(name)
        if entry is None:
            raise IndexVersionError(f"{vdir}: {name} is not listed in the manifest")
        path = os.path.join(vdir, name)
        if not os.path.isfile(path):
            raise IndexVersionError(f"{path}: missing file listed in the manifest")
        if os.path.getsize(path) != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise IndexVersionError(f"{path}: sha256 mismatch (file changed since the index was built)")


def finalize_manifest(vdir: str, manifest: dict) -> dict:
    """Add version-independent fields and the sha256/size of every file in `vdir`, then write
    ``manifest.json`` there (the manifest itself is not hashed)."""
    files = {}
    for name in sorted(os.listdir(vdir)):
        if name == MANIFEST:
            continue
        p = os.path.join(vdir, name)
        files[name] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p)}
    manifest = {"format": FORMAT, **manifest, "files": files}
    manifest.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="microseconds"))
    tmp = os.path.join(vdir, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(vdir, MANIFEST))
    return manifest


def resolve_version(path: str, version: str | None = None) -> tuple[IndexHome, str]:
    """``ROOT/NAME`` (+ optional version) or a version directory -> (home, version)."""
    p = _local(path).rstrip("/")
    if version is None and os.path.isfile(os.path.join(p, MANIFEST)):
        return IndexHome(os.path.dirname(p)), os.path.basename(p)
    if not os.path.isdir(p):
        raise IndexVersionError(f"{path}: no such index (expected ROOT/NAME with a {CURRENT} file)")
    home = IndexHome(p)
    return home, version or home.require_current()


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
