"""Nightly re-index, the work dir's small files: size-capped JSON state, the run log, the locks.

``WORK/state.json`` (committed generation) and ``WORK/pending.json`` (the running one) are read
with a size cap and replaced atomically; ``WORK/reindex.jsonl`` is an append-only log (one JSON
object per step); ``WORK/.reindex.lock`` and ``ROOT/NAME/.reindex.lock`` are ``flock``ed by the
running run.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import numpy as np

from contracts.storage import write_text_atomic
from index.ann.versions import IndexHome, read_small_file

__all__ = [
    "LOCK_FILE",
    "LOG_FILE",
    "MAX_STATE_BYTES",
    "PENDING_FILE",
    "STATE_FILE",
    "LockHeldError",
    "ReindexError",
    "RunLock",
    "RunLog",
    "now",
    "read_json",
    "read_log",
    "reindex_locks",
    "remove_tree",
    "write_json_atomic",
]

STATE_FILE = "state.json"
PENDING_FILE = "pending.json"
LOG_FILE = "reindex.jsonl"
LOCK_FILE = ".reindex.lock"


class ReindexError(RuntimeError):
    """A run that cannot go on (inconsistent work dir, bad validation set, ...)."""


class LockHeldError(ReindexError):
    """Another run holds the work-dir or index lock."""


MAX_STATE_BYTES = 16 << 20  # state.json / pending.json / _embed.json: small by construction


def read_json(path: str) -> dict | None:
    """A JSON file's object, or None when the file does not exist. Refused (one line, never the
    content): not a regular file, over MAX_STATE_BYTES, not JSON, not an object."""
    try:
        data = read_small_file(path, MAX_STATE_BYTES, "work-dir file", ReindexError)
        obj = json.loads(data)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # written atomically, so this is outside damage
        raise ReindexError(f"{path}: unreadable JSON ({type(e).__name__} at byte {getattr(e, 'pos', '?')}); "
                           "restore or delete it") from None
    if not isinstance(obj, dict):
        raise ReindexError(f"{path}: not a JSON object; restore or delete it")
    return obj


def write_json_atomic(path: str, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def remove_tree(path: str) -> None:
    """Remove a directory: renamed aside first, so a kill mid-way never leaves a partial one
    under its real name."""
    if not os.path.lexists(path):
        return
    parent, base = os.path.split(path.rstrip("/"))
    aside = os.path.join(parent, f".tmp-del-{base}-{uuid.uuid4().hex[:6]}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


class RunLog:
    """Append-only JSON-lines log (one object per event, flushed and fsynced). A line cut by a
    kill is skipped by `read_log`."""

    def __init__(self, path: str, run_id: str):
        self.path, self.run_id = path, run_id

    def write(self, step: str, status: str, **fields) -> dict:
        event = {"time": now(), "run": self.run_id, "step": step, "status": status, **fields}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(event, sort_keys=True, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return event


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def read_log(path: str) -> list[dict]:
    """All complete events of a run log (a torn last line is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


class RunLock:
    """Exclusive, non-blocking ``flock`` on `path` for the lifetime of the context. The kernel
    drops it when the process dies (even on SIGKILL), so there is no stale lock to detect.
    The holder's pid and start time are written into the file for the error message."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise LockHeldError(f"another reindex run holds the lock {self.path}"
                                    + (f" ({holder})" if holder else "")) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {now()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def reindex_locks(work: str, home: IndexHome) -> Iterator[None]:
    """Both locks: the work dir's (two runs never share state) and the index's (two runs with
    different work dirs never publish the same index at once)."""
    with RunLock(os.path.join(work, LOCK_FILE)), RunLock(os.path.join(home.path, LOCK_FILE)):
        yield
