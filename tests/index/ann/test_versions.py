import json
import os
import threading
from pathlib import Path

import pytest

from index.ann.versions import (
    CURRENT,
    MANIFEST,
    IndexHome,
    IndexVersionError,
    finalize_manifest,
    resolve_version,
)


def make_version(home: IndexHome, payload: bytes = b"x", version: str | None = None) -> str:
    with home.new_version(version) as (ver, tmp):
        with open(os.path.join(tmp, "shard-000.faiss"), "wb") as f:
            f.write(payload)
        finalize_manifest(tmp, {"version": ver, "num_shards": 1})
    return ver


def test_version_appears_complete_with_sha256(tmp_path):
    home = IndexHome.of(tmp_path, "idx")
    ver = make_version(home, b"hello")
    vdir = home.version_dir(ver)
    man = json.loads(Path(vdir, MANIFEST).read_text())
    import hashlib
    assert man["files"]["shard-000.faiss"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert man["files"]["shard-000.faiss"]["bytes"] == 5
    assert home.list_versions() == [ver]
    assert home.current() is None  # writing a version does not publish it
    assert [e for e in os.listdir(home.path) if e.startswith(".")] == []


def test_failed_version_leaves_nothing(tmp_path):
    home = IndexHome.of(tmp_path, "idx")
    with pytest.raises(RuntimeError), home.new_version() as (_, tmp):
        Path(tmp, "shard-000.faiss").write_bytes(b"partial")
        raise RuntimeError("crash mid-build")
    with pytest.raises(IndexVersionError, match="manifest"), home.new_version() as (_, tmp):
        Path(tmp, "shard-000.faiss").write_bytes(b"no manifest")
    assert os.listdir(home.path) == []
    assert home.list_versions() == []


def test_publish_rollback_and_current(tmp_path):
    home = IndexHome.of(tmp_path, "idx")
    v1, v2, v3 = (make_version(home, bytes([i])) for i in range(3))
    assert home.list_versions() == [v1, v2, v3]
    with pytest.raises(IndexVersionError, match="no published version"):
        home.require_current()
    with pytest.raises(IndexVersionError):
        home.publish("does-not-exist")
    home.publish(v3)
    assert Path(home.path, CURRENT).read_text().strip() == v3
    assert home.rollback() == v2 and home.current() == v2
    assert home.rollback() == v1 and home.current() == v1
    with pytest.raises(IndexVersionError, match="no version older"):
        home.rollback()
    assert home.rollback(to=v3) == v3
    with pytest.raises(IndexVersionError, match="unknown version"):
        home.rollback(to="nope")
    assert resolve_version(home.path) == (home, v3)
    assert resolve_version(home.version_dir(v1))[1] == v1


def test_prune_keeps_newest_and_current(tmp_path):
    home = IndexHome.of(tmp_path, "idx")
    vs = [make_version(home, bytes([i])) for i in range(5)]
    home.publish(vs[0])  # an old version is CURRENT (after a rollback, say)
    deleted = home.prune(keep=2)
    assert deleted == vs[1:3]
    assert home.list_versions() == [vs[0], vs[3], vs[4]]
    assert home.current() == vs[0]
    with pytest.raises(IndexVersionError):
        home.prune(keep=0)


def test_verify_detects_tampering(tmp_path):
    home = IndexHome.of(tmp_path, "idx")
    ver = make_version(home, b"abcdef")
    home.verify(ver)
    path = os.path.join(home.version_dir(ver), "shard-000.faiss")
    Path(path).write_bytes(b"abcdeF")  # same size, one byte changed
    with pytest.raises(IndexVersionError, match="sha256"):
        home.verify(ver)
    os.remove(path)
    with pytest.raises(IndexVersionError, match="missing"):
        home.verify(ver)


def test_current_is_never_partial_under_concurrent_publish(tmp_path):
    home = IndexHome.of(tmp_path, "idx")
    vs = [make_version(home, bytes([i])) for i in range(3)]
    home.publish(vs[0])
    stop = threading.Event()
    seen, errors = set(), []

    def reader():
        while not stop.is_set():
            try:
                v = home.current()
                seen.add(v)
                home.manifest(v)
            except Exception as e:  # noqa: BLE001 - any failure is a test failure
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(300):
        home.publish(vs[i % 3])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert seen <= set(vs)


def test_rejects_bad_version_names_and_urls(tmp_path):
    home = IndexHome.of(tmp_path, "idx")
    with pytest.raises(IndexVersionError):
        home.version_dir("../escape")
    with pytest.raises(IndexVersionError, match="local"):
        IndexHome.of("s3://bucket/indexes", "idx")
