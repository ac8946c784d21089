"""Paths on any filesystem pyarrow understands, and outputs that appear only when complete.

Every job writes to a temporary name beside the target and renames it into place at the end,
so a crash, a full disk or a bad input never leaves a half-written output where a finished one
is expected, and never destroys the previous output.

A URI (s3://, gs://, ...) is never turned into a local folder: it is opened through pyarrow
(which honours AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for S3-compatible servers). Object
stores have no rename, so a directory output for a URI is staged in a local temporary folder,
uploaded in full under a temporary prefix beside the target, and only then published by
server-side moves (old objects moved aside first, put back if publishing fails). A failed job or
upload therefore never touches the target; readers during the few seconds of publishing may see
a mix of old and new files, which is why index roots and the nightly work dir (which need an
atomic rename) stay on local or mounted (EFS/NFS) paths.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

__all__ = ["StorageError", "atomic_dir", "atomic_path", "check_writable", "is_uri", "replace_dir",
           "resolve", "write_bytes_atomic", "write_text_atomic"]


class StorageError(OSError):
    """A URI that cannot be opened or written (bad scheme, missing bucket, no endpoint)."""


def is_uri(path: str) -> bool:
    """True for 's3://...', 'gs://...'; False for plain paths and 'file://' (a local path)."""
    path = str(path)
    return "://" in path and not path.startswith("file://")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """'s3://b/k', 'gs://...', 'file:///x' or a plain local path -> (filesystem, path in it).

    Raises StorageError (one line) for a URI pyarrow cannot open (unknown scheme, bad URI).
    """
    path = str(path)
    if path.startswith("file://"):
        return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as e:  # noqa: BLE001 -- pyarrow raises ArrowInvalid/OSError/...
            raise StorageError(f"{path}: cannot open this URI ({_one_line(e)})") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def check_writable(path: str) -> None:
    """Fail early, in one line, if the bucket (top folder) of URI `path` is missing or the
    server cannot be reached; local paths are not checked (the write itself reports them)."""
    if not is_uri(path):
        return
    fs, p = resolve(path)
    bucket = p.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except Exception as e:  # noqa: BLE001 -- unreachable endpoint, refused credentials
        raise StorageError(f"{path}: cannot reach the storage ({_one_line(e)})") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{path}: bucket {bucket!r} does not exist")


def _tmp_name(path: str) -> str:
    parent, base = os.path.split(path.rstrip("/"))
    return os.path.join(parent, f".tmp-{base}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """Yield (fs, temporary file path); on success move it onto `path`, on error delete it."""
    check_writable(path)
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
    """Yield a fresh local temporary directory; on success it replaces `path`.

    An existing `path` is kept until the new one is complete, then swapped out and removed.
    For a URI the local folder is uploaded and published as the module docstring says.
    """
    if is_uri(path):
        with _remote_dir(str(path)) as tmp:
            yield tmp
        return
    target = os.path.abspath(str(path).removeprefix("file://"))
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


@contextlib.contextmanager
def _remote_dir(uri: str) -> Iterator[str]:
    check_writable(uri)  # before the job's work, not after it
    fs, target = resolve(uri)
    target = target.rstrip("/")
    local = tempfile.mkdtemp(prefix="cr-stage-")
    try:
        yield local
        remote_tmp = _tmp_name(target)
        try:
            pafs.copy_files(local, remote_tmp, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            _publish(fs, remote_tmp, target)
        finally:
            with contextlib.suppress(Exception):
                fs.delete_dir(remote_tmp)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _files_under(fs: pafs.FileSystem, root: str) -> list[str]:
    """Paths of the files under `root`, relative to it ([] when it does not exist)."""
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


def _publish(fs: pafs.FileSystem, src: str, target: str) -> None:
    """Move every file under `src` to `target` (object stores: no directory rename).

    The old files are moved aside first and put back if a move fails, so `target` ends up
    either wholly old or wholly new.
    """
    old_dir = _tmp_name(target) + ".old"
    old = _files_under(fs, target)
    moved_aside: list[str] = []
    placed: list[str] = []
    try:
        for rel in old:
            fs.move(f"{target}/{rel}", f"{old_dir}/{rel}")
            moved_aside.append(rel)
        for rel in _files_under(fs, src):
            fs.move(f"{src}/{rel}", f"{target}/{rel}")
            placed.append(rel)
    except BaseException:
        for rel in placed:
            with contextlib.suppress(Exception):
                fs.delete_file(f"{target}/{rel}")
        for rel in moved_aside:
            with contextlib.suppress(Exception):
                fs.move(f"{old_dir}/{rel}", f"{target}/{rel}")
        raise
    with contextlib.suppress(Exception):
        fs.delete_dir(old_dir)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_path(path) as (fs, tmp), fs.open_output_stream(tmp) as f:
        f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode())
