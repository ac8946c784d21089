"""WebDataset shards: writing them deterministically and reading them back safely.

Layout (DESIGN.md, "Contracts / WebDataset shards"): ``shards/<split>-NNNNNN.tar``; one sample
per image with three tar members

    <key>.jpg | <key>.png   the encoded image bytes (the original file's bytes unless resized)
    <key>.json              the manifest row {"image_id", "item_id", "camera_id", "split", "path"}

``<key>`` is ``key_for(image_id)``: the image id percent-encoded (RFC 3986, nothing kept but
letters, digits and ``_-~``) with ``.`` also encoded as ``%2E``. So a key has no dot (WebDataset
splits a member name at the first dot of its base name) and no ``/`` (no directories), and the
mapping is injective and reversible: ``image_id_for(key_for(x)) == x``.

Determinism: members are written in the order given (callers sort by image_id), with fixed
mtime 0, uid/gid 0, empty user/group names, mode 0444, PAX format (long names need no
truncation): the same samples always give byte-identical tar files. The bytes are the same as
webdataset's own TarWriter with those settings (a test checks it); tarfile is used directly
only because importing webdataset imports torch.

Reading: ``iter_shard_samples`` reads each tar (one shard at a time, in memory) with
``tarfile``, never turns a member name into a filesystem path (nothing is extracted), skips
non-regular members (links, directories, devices), and on a
truncated or corrupt tar yields the complete samples before the damage, reports the error
through ``on_error`` (default: a ShardReadWarning) and goes on with the next shard. A sample
whose JSON does not parse or breaks the manifest row contract (``checked_row``) is reported
through ``on_bad_sample`` (default: a ShardReadWarning) and the reader goes on with the next
sample of the same shard: one bad sample never costs the others.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import io
import itertools
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from urllib.parse import quote, unquote

IMAGE_EXTS = ("jpg", "png")
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
DEFAULT_SHARD_SIZE = 1000


class ShardReadWarning(UserWarning):
    """A shard could not be read to its end (truncated, corrupt, missing)."""


def key_for(image_id: str) -> str:
    """image_id -> WebDataset key: injective, no '.', no '/', tar-safe ASCII."""
    if not image_id:
        raise ValueError("empty image_id has no key")
    return quote(image_id, safe="").replace(".", "%2E")


def image_id_for(key: str) -> str:
    """Inverse of key_for."""
    return unquote(key)


def shard_name(split: str, index: int) -> str:
    """'<split>-NNNNNN.tar' (index zero-padded to 6 digits)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"bad split name for a shard: {split!r}")
    return f"{split}-{index:06d}.tar"


def row_json(row: Mapping) -> bytes:
    """The manifest row as canonical JSON bytes (sorted keys, no spaces)."""
    keep = {k: row[k] for k in ("image_id", "item_id", "camera_id", "split", "path")}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _TarWriter:
    """Writes samples exactly as webdataset.TarWriter(user="", group="", mode=0o444, mtime=0,
    encoder=False, format="PAX_FORMAT") does (members in sorted extension order), without
    importing webdataset, whose import pulls in torch (~3 s per process)."""

    def __init__(self, fileobj):
        # Closed by close(); the caller owns `fileobj`.
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def write(self, sample: Mapping[str, bytes | str]) -> None:
        key = sample["__key__"]
        for ext in sorted(sample):
            if ext == "__key__":
                continue
            data = sample[ext]
            data = data.encode() if isinstance(data, str) else bytes(data)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def _tar_writer(fileobj) -> _TarWriter:
    return _TarWriter(fileobj)


def write_shards(samples: Iterable[tuple[Mapping, bytes, str]], out_dir: str, split: str,
                 shard_size: int = DEFAULT_SHARD_SIZE) -> list[str]:
    """Write (row, image_bytes, ext) samples of one split into out_dir/<split>-NNNNNN.tar.

    ext is "jpg" or "png". Samples are written in the order given, `shard_size` per shard.
    Returns the shard paths written (none when `samples` is empty). Local paths only: the
    caller writes into a temporary directory and moves it into place.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    it = iter(samples)
    while chunk := list(itertools.islice(it, shard_size)):
        path = os.path.join(out_dir, shard_name(split, len(paths)))
        with open(path, "wb") as stream, contextlib.closing(_tar_writer(stream)) as writer:
            for row, data, ext in chunk:
                if ext not in IMAGE_EXTS:
                    raise ValueError(f"image extension must be one of {IMAGE_EXTS}, got {ext!r}")
                if row["split"] != split:
                    raise ValueError(
                        f"row {row['image_id']!r} has split {row['split']!r}, not {split!r}")
                writer.write({"__key__": key_for(row["image_id"]), ext: bytes(data),
                              "json": row_json(row)})
        paths.append(path)
    return paths


def _open(url: str):
    if "://" in url and not url.startswith("file://"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)
        return fs.open_input_stream(path)
    url = url.removeprefix("file://")
    return open(url, "rb")


def _split_member(name: str) -> tuple[str, str] | tuple[None, None]:
    """Member name -> (key, ext) the WebDataset way (key ends at the base name's first dot)."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def _default_on_error(url: str, exc: BaseException) -> None:
    warnings.warn(f"shard {url}: {type(exc).__name__}: {exc}", ShardReadWarning, stacklevel=3)


def _default_on_bad_sample(url: str, image_id: str, reason: str) -> None:
    warnings.warn(f"shard {url}: sample {image_id!r}: {reason}", ShardReadWarning, stacklevel=3)


def checked_row(key: str, raw: bytes) -> tuple[dict, str | None]:
    """A sample's JSON member -> (row, None) if it is a valid manifest row, else
    ({"image_id": ...}, reason). The image_id is the row's own when it is a usable string,
    else the one the key encodes (image_id_for), so the bad sample can still be named."""
    from contracts.manifest import row_problem

    try:
        row = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return {"image_id": image_id_for(key)}, f"bad JSON: {str(e).splitlines()[0]}"
    reason = row_problem(row)
    if reason is None:
        return row, None
    own = row.get("image_id") if isinstance(row, dict) else None
    return {"image_id": own if isinstance(own, str) and own else image_id_for(key)}, f"bad manifest row: {reason}"


def iter_shard_samples(urls: str | Iterable[str],
                       on_error: Callable[[str, BaseException], None] | None = None,
                       on_bad_sample: Callable[[str, str, str], None] | None = None
                       ) -> Iterator[tuple[str, bytes, str, dict]]:
    """Yield (key, image_bytes, ext, row_dict) for every complete, valid sample of the shards.

    urls: one path/URL or several (local paths, file://, or any URI pyarrow opens).
    ext is "jpg" or "png"; row_dict is the JSON manifest row, checked (``checked_row``). A
    sample missing its image or its JSON is skipped. A sample whose JSON is bad calls
    on_bad_sample(url, image_id, reason) (default: warn) and is not yielded. Shard errors
    (truncated tar, unreadable file) call on_error(url, exception) (default: warn with
    ShardReadWarning) and the reader moves on to the next shard after yielding what could be read.
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = [os.fspath(urls)]
    report = on_error or _default_on_error
    bad_sample = on_bad_sample or _default_on_bad_sample
    for url in urls:
        url = os.fspath(url)
        try:
            with _open(url) as f:
                data = f.read()
            for key, image, ext, raw in _iter_one(data):
                row, reason = checked_row(key, raw)
                if reason is None:
                    yield key, image, ext, row
                else:
                    bad_sample(url, row["image_id"], reason)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            report(url, e)


def _iter_one(data: bytes) -> Iterator[tuple[str, bytes, str, bytes]]:
    """(key, image bytes, ext, JSON bytes) of each complete sample of one tar held in memory."""
    current_key = None
    parts: dict[str, bytes] = {}

    def emit():
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if image_ext is None or "json" not in parts:
            return None
        return current_key, parts[image_ext], image_ext, parts["json"]

    # The whole shard is in memory (shards are small by design), so members are read from a
    # BytesIO and nothing is ever extracted to disk.
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = _split_member(member.name)
            if key is None:
                continue
            if key != current_key:
                if current_key is not None:
                    out = emit()
                    if out is not None:
                        yield out
                current_key, parts = key, {}
            f = tar.extractfile(member)
            parts[ext] = f.read() if f is not None else b""
            if len(parts[ext]) != member.size:
                raise tarfile.ReadError(f"member {member.name!r} is truncated")
        end = tar.offset
    # tarfile silently stops at a truncated or garbled header; a complete archive ends with a
    # zero block exactly where iteration stopped.
    tail = data[end:end + tarfile.BLOCKSIZE]
    complete = len(tail) == tarfile.BLOCKSIZE and tail.count(0) == tarfile.BLOCKSIZE
    # The last group's members were read in full (sizes checked), so it is yielded either way.
    if current_key is not None:
        out = emit()
        if out is not None:
            yield out
    if not complete:
        raise tarfile.ReadError(f"truncated or corrupt tar at byte {end} of {len(data)}")


def list_shards(dir_or_glob: str | os.PathLike, split: str | None = None) -> list[str]:
    """Sorted shard paths of a make_shards output dir, a shards dir, or a glob pattern.

    A directory holding a `shards/` folder (a make_shards output) is looked into. `split`
    keeps only '<split>-NNNNNN.tar'. Remote URIs (s3://, gs://) are listed through pyarrow.
    """
    spec = os.fspath(dir_or_glob)
    if "://" in spec and not spec.startswith("file://"):
        names = _list_remote(spec)
    else:
        spec = spec.removeprefix("file://")
        if any(c in spec for c in "*?["):
            names = glob.glob(spec)
        elif os.path.isdir(spec):
            base = os.path.join(spec, "shards") if os.path.isdir(os.path.join(spec, "shards")) else spec
            names = [os.path.join(base, n) for n in os.listdir(base)]
        elif os.path.isfile(spec):
            names = [spec]
        else:
            raise FileNotFoundError(f"no shards at {spec}")
    out = []
    for n in names:
        m = SHARD_RE.match(os.path.basename(n))
        if m and (split is None or m.group("split") == split):
            out.append(n)
    return sorted(out)


def _list_remote(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0]
    pattern = None
    if any(c in uri for c in "*?["):
        uri, pattern = uri.rsplit("/", 1)
    fs, path = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    if pattern is None and any(i.base_name == "shards" and i.type == pafs.FileType.Directory
                               for i in infos):
        infos = fs.get_file_info(pafs.FileSelector(path + "/shards", recursive=False))
    names = [i.path for i in infos if i.type == pafs.FileType.File]
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(os.path.basename(n), pattern)]
    return [f"{scheme}://{n}" for n in names]
