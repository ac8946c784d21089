"""Paths on any filesystem pyarrow understands, and outputs that appear only when complete.

Every job writes to a temporary name beside the target and renames it into place at the end,
so a crash, a full disk or a bad input never leaves a half-written output where a finished one
is expected, and never destroys the previous output.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

__all__ = [
    "atomic_dir",
    "atomic_path",
    "replace_dir",
    "resolve",
    "write_bytes_atomic",
    "write_text_atomic",
]


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """'s3://b/k', 'gs://...', 'file:///x' or a plain local path -> (filesystem, path in it)."""
    path = str(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _tmp_name(path: str) -> str:
    parent, base = os.path.split(path.rstrip("/"))
    return os.path.join(parent, f".tmp-{base}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """Yield (fs, temporary file path); on success move it onto `path`, on error delete it."""
    fs, target = resolve(path)
    fs.create_dir(os.path.dirname(target), recursive=True)
    tmp = _tmp_name(target)
    try:
        yield fs, tmp
        fs.move(tmp, target)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a fresh local temporary directory; on success it replaces `path` (local paths).

    An existing `path` is kept until the new one is complete, then swapped out and removed.
    """
    target = os.path.abspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = _tmp_name(target)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def replace_dir(src: str, target: str) -> None:
    """Rename directory `src` onto `target`, moving an existing target aside first (to
    `.old-<name>-<random>`: not a `.tmp-` name, so nothing that sweeps temporary outputs ever
    deletes the previous output while it is aside)."""
    old = None
    if os.path.lexists(target):
        parent, base = os.path.split(target.rstrip("/"))
        old = os.path.join(parent, f".old-{base}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(src, target)
    except BaseException:
        if old:  # put the previous output back: `target` never goes missing
            os.rename(old, target)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_path(path) as (fs, tmp), fs.open_output_stream(tmp) as f:
        f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode())
