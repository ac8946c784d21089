"""A write that fails half-way (disk full, ENOSPC) leaves the previous output intact and no
half-written output where a finished one is expected: contracts.storage helpers, make_shards,
build_index (shard file, ids file, publish of CURRENT), query results and the evaluate report.
embed and centroids (Ray jobs) are in test_ray_jobs.py.

Already covered elsewhere: model save (tests/model/test_checkpoint.py::
test_save_replaces_and_failure_keeps_previous), make_shards with all images bad
(tests/pipelines/test_make_shards.py::test_rerun_replaces_previous_output_and_failure_keeps_it),
an index version that fails before its manifest (tests/index/test_versions.py::
test_failed_version_leaves_nothing).
"""
from __future__ import annotations

import builtins
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from contracts import storage
from index.ann.build import BuildConfig, build_index
from index.ann.search import open_index
from index.ann.versions import IndexHome
from pipelines import build_index as build_job
from pipelines import evaluate as evaluate_job
from pipelines import make_shards as shards_job
from pipelines import query as query_job
from pipelines._cli import run_main
from tests.faults.diskfull import (
    FullFile,
    FullParquetWriter,
    enospc,
    full_open,
    half_write_table,
    leftovers,
    tree,
)
from tests.index.index_data import clustered, write_vectors

DIM = 16


def cli(mod, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(mod.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_disk_full_error(code, err):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "No space left on device" in err, err


# ---- contracts.storage ------------------------------------------------------------------------------

class FullFS:
    """The part of a pyarrow filesystem atomic_path uses; output streams fill up after `room` bytes."""

    def __init__(self, room: int):
        import pyarrow.fs as pafs

        self.real, self.room = pafs.LocalFileSystem(), room

    def create_dir(self, path, recursive=True):
        self.real.create_dir(path, recursive=recursive)

    def open_output_stream(self, path):
        return FullFile(path, self.room)

    def move(self, src, dst):
        self.real.move(src, dst)

    def delete_file(self, path):
        self.real.delete_file(path)


def test_atomic_path_disk_full_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "report.json"
    storage.write_text_atomic(str(target), "previous\n")
    monkeypatch.setattr(storage, "resolve", lambda p: (FullFS(room=10), os.path.abspath(p)))
    with pytest.raises(OSError, match="No space left"):
        storage.write_text_atomic(str(target), "new contents that do not fit\n" * 10)
    assert target.read_text() == "previous\n"
    assert os.listdir(tmp_path / "out") == ["report.json"]  # the half-written temp file is gone


def test_atomic_dir_disk_full_keeps_previous_dir(tmp_path):
    out = tmp_path / "out"
    with storage.atomic_dir(str(out)) as tmp:
        (open(os.path.join(tmp, "a.txt"), "w")).close()
    before = tree(out)
    with pytest.raises(OSError, match="No space left"), storage.atomic_dir(str(out)) as tmp, \
            FullFile(os.path.join(tmp, "a.txt"), room=3) as f:
        f.write(b"0123456789")
    assert tree(out) == before and leftovers(tmp_path) == []


def test_atomic_dir_swap_failure_puts_previous_back(tmp_path, monkeypatch):
    """If renaming the finished temp dir into place fails (after the old one was moved aside),
    the old output is moved back: `out` never goes missing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".tmp-out-") and not str(src).endswith(".old") \
                and str(dst) == str(out):
            raise enospc(dst)
        return real_rename(src, dst)

    monkeypatch.setattr(storage.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"), storage.atomic_dir(str(out)) as tmp:
        (open(os.path.join(tmp, "new.txt"), "w")).close()
    monkeypatch.undo()
    assert tree(out) == {"keep.txt": b"previous"}


# ---- make_shards ----------------------------------------------------------------------------------

def _market(root, n=6):
    (root / "bounding_box_test").mkdir(parents=True)
    (root / "query").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        for d in ("bounding_box_test", "query"):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
            (root / d / f"{i + 1:04d}_c{i % 2 + 1}s1_{i:06d}_01.jpg").write_bytes(buf.getvalue())
    return root


@pytest.mark.parametrize("where", ["shard", "manifest", "rejected"])
def test_make_shards_disk_full_keeps_previous_output(tmp_path, capsys, monkeypatch, where):
    import contracts.manifest
    import model.ingest
    import model.shards

    root = _market(tmp_path / "root")
    out = tmp_path / "out"
    args = ["--format", "market1501", "--root", root, "--out", out, "--workers", 1, "--shard-size", 3]
    assert cli(shards_job, args, capsys)[0] == 0
    before = tree(out)
    (root / "query" / "0007_c1s1_000007_01.jpg").write_bytes((root / "query" / "0001_c1s1_000000_01.jpg").read_bytes())
    if where == "shard":  # the 2nd shard file fills the disk part-way through
        monkeypatch.setattr(model.shards, "open", full_open(builtins.open, 700, lambda p: p.endswith("000001.tar")),
                            raising=False)
    elif where == "manifest":
        monkeypatch.setattr(contracts.manifest.pq, "write_table", half_write_table(pq.write_table))
    else:
        real = pq.write_table
        monkeypatch.setattr(pq, "write_table", lambda t, w, *a, **k: (half_write_table(real) if
                                                                      str(w).endswith("rejected.parquet") else real)(t, w, *a, **k))
    code, _, err = cli(shards_job, args, capsys)
    assert_disk_full_error(code, err)
    assert tree(out) == before and leftovers(tmp_path) == []


# ---- build_index: shard files, ids files, publish -----------------------------------------------

@pytest.fixture
def built(tmp_path):
    write_vectors(tmp_path / "v.parquet", clustered(200, DIM, seed=1))
    res = build_index(str(tmp_path / "v.parquet"), str(tmp_path / "idx"), "g",
                      BuildConfig(shards=2, index_type="flat"), version="v1")
    write_vectors(tmp_path / "q.parquet", clustered(5, DIM, seed=2), prefix="q")
    return tmp_path, res


def _serves_v1(tmp_path):
    home = IndexHome.of(str(tmp_path / "idx"), "g")
    assert home.current() == "v1" and home.verify()["version"] == "v1"
    idx = open_index(str(tmp_path / "idx" / "g"), verify=True)
    try:
        assert idx.version == "v1" and len(idx) == 200
        hits = idx.search(clustered(3, DIM, seed=5), 4)
        assert hits.valid.all()
    finally:
        idx.close()


@pytest.mark.parametrize("where", ["faiss", "ids", "current"])
def test_build_index_disk_full_keeps_serving_previous_version(built, capsys, monkeypatch, where):
    import faiss

    import index.ann.versions

    tmp_path, _ = built
    before = tree(tmp_path / "idx" / "g" / "v1")
    if where == "faiss":
        real = faiss.write_index

        def write_index(idx, path):
            real(idx, path)
            if path.endswith("shard-001.faiss"):
                os.truncate(path, os.path.getsize(path) // 2)
                raise enospc(path)
        monkeypatch.setattr(faiss, "write_index", write_index)
    elif where == "ids":
        monkeypatch.setattr(pq, "ParquetWriter", FullParquetWriter)
    else:
        monkeypatch.setattr(index.ann.versions, "open",
                            full_open(builtins.open, 1, lambda p: os.path.basename(p).startswith(".tmp-CURRENT")),
                            raising=False)
    code, _, err = cli(build_job, ["--vectors", tmp_path / "v.parquet", "--root", tmp_path / "idx", "--name", "g",
                                   "--shards", 2, "--index-type", "flat", "--version", "v2"], capsys)
    monkeypatch.undo()
    assert_disk_full_error(code, err)
    _serves_v1(tmp_path)
    assert tree(tmp_path / "idx" / "g" / "v1") == before
    home = IndexHome.of(str(tmp_path / "idx"), "g")
    if where == "current":  # v2 was complete before the publish failed: it stays, unpublished
        assert home.list_versions() == ["v1", "v2"] and home.verify("v2")["version"] == "v2"
    else:
        assert home.list_versions() == ["v1"]
        assert not [n for n in os.listdir(tmp_path / "idx" / "g") if n.startswith(".tmp-v2")]


# ---- query results, evaluate report -------------------------------------------------------------

def test_query_results_disk_full_keeps_previous_results(built, capsys, monkeypatch):
    import contracts.results

    tmp_path, _ = built
    args = ["--index", tmp_path / "idx" / "g", "--queries", tmp_path / "q.parquet", "--k", 3,
            "--out", tmp_path / "res", "--batch-size", 2]
    assert cli(query_job, args, capsys)[0] == 0
    before = tree(tmp_path / "res")
    monkeypatch.setattr(contracts.results.pq, "write_table", half_write_table(pq.write_table))
    code, _, err = cli(query_job, args[:-4] + ["--k", 4, "--out", tmp_path / "res"], capsys)
    assert_disk_full_error(code, err)
    assert tree(tmp_path / "res") == before and leftovers(tmp_path) == []


def test_evaluate_report_disk_full_keeps_previous_report(tmp_path, capsys, monkeypatch):
    from tests.pipelines.test_evaluate import write_embeddings

    rng = np.random.default_rng(0)
    items = np.repeat(np.arange(10), 4)
    x = clustered(len(items), DIM, seed=3)
    write_embeddings(tmp_path / "q.parquet", x[::4], items[::4], np.ones(10, int), "query")
    write_embeddings(tmp_path / "g.parquet", x, items, rng.integers(2, 4, len(items)), "gallery")
    out = tmp_path / "reports" / "report.json"
    args = ["--query", tmp_path / "q.parquet", "--gallery", tmp_path / "g.parquet", "--out", out]
    assert cli(evaluate_job, args, capsys)[0] == 0
    before = out.read_bytes()
    assert json.loads(before)["num_queries"] == 10
    monkeypatch.setattr(storage, "resolve", lambda p: (FullFS(room=20), os.path.abspath(p)))
    code, _, err = cli(evaluate_job, args + ["--mode", "both"], capsys)
    assert_disk_full_error(code, err)
    assert out.read_bytes() == before and os.listdir(out.parent) == ["report.json"]


# ---- model directory (train's output) -------------------------------------------------------------

def test_save_model_swap_failure_keeps_previous_model(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import model.checkpoint as ck
    from model.config import ModelConfig

    target = tmp_path / "model"
    ck.save_model(torch.nn.Linear(2, 2), ModelConfig(), str(target))
    before = tree(target)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".tmp-model-") and str(dst) == str(target):
            raise enospc(dst)
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(OSError):
        ck.save_model(torch.nn.Linear(2, 2), ModelConfig(), str(target))
    monkeypatch.undo()
    assert tree(target) == before
