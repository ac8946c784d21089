"""Simulated full disk: writers that put part of their bytes on disk, then fail with ENOSPC.

Monkeypatch helpers only (portable, no root, no tmpfs): each replaces one writer the job
really uses, so the job's own temp-name-then-rename logic is what the tests exercise.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pyarrow.parquet as pq


def enospc(path="") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


class FullFile(io.RawIOBase):
    """A binary file that accepts `room` bytes, writes them, then raises ENOSPC."""

    def __init__(self, path, room: int):
        self._f = open(path, "wb")  # noqa: SIM115 -- closed in close()
        self.path, self.room = path, room

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)
        if len(b) > self.room:
            self._f.write(b[: self.room])
            self._f.flush()
            self.room = 0
            raise enospc(self.path)
        self.room -= len(b)
        return self._f.write(b)

    def close(self):
        if not self._f.closed:
            self._f.close()
        super().close()


def full_open(real_open, room: int, match=lambda path: True):
    """A replacement for the builtin `open` in one module: binary/text writes to matching paths
    fail after `room` bytes; everything else is the real open."""
    def fake(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and match(str(file)):
            raw = FullFile(file, room)
            return raw if "b" in mode else io.TextIOWrapper(io.BufferedWriter(raw, 1), write_through=True)
        return real_open(file, mode, *args, **kwargs)
    return fake


def half_write_table(real_write_table):
    """pq.write_table that leaves half a file at its destination, then raises ENOSPC."""
    def fake(table, where, *args, **kwargs):
        buf = io.BytesIO()
        real_write_table(table, buf, *args, **{k: v for k, v in kwargs.items() if k != "filesystem"})
        data = buf.getvalue()
        if isinstance(where, (str, os.PathLike)):
            with open(where, "wb") as f:
                f.write(data[: len(data) // 2])
        raise enospc(where)
    return fake


class FullParquetWriter(pq.ParquetWriter):
    """pq.ParquetWriter whose footer never makes it: close() truncates the file to half and
    raises ENOSPC (rows were accepted, the disk filled up at the end)."""

    def __init__(self, where, *args, **kwargs):
        super().__init__(where, *args, **kwargs)
        self._where = where

    def close(self):
        if getattr(self, "_closed_full", False):
            return
        self._closed_full = True
        super().close()
        if isinstance(self._where, (str, os.PathLike)) and os.path.exists(self._where):
            size = os.path.getsize(self._where)
            os.truncate(self._where, size // 2)
        raise enospc(self._where)

    def __del__(self):  # a writer the job never closed (it stopped at the first error): quietly
        import contextlib

        with contextlib.suppress(Exception):
            self.close()


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes): to compare an output before and after."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary names a job left beside its output."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(".tmp-"))
