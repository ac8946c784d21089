"""Bad vector files through build_index / query / evaluate (in-process, no Ray): a one-line
`error: ...`, exit status 2, and the output that was already there is untouched.

Already covered elsewhere (not repeated): NaN rows and a missing file
(tests/pipelines/test_build_index.py::test_bad_inputs_one_line_error_exit_2), query of another
model / dimension / missing file (tests/pipelines/test_query.py::test_query_errors_are_one_line),
evaluate with NaN / other model / other dimension / empty split / no embedding column
(tests/pipelines/test_evaluate.py::test_evaluate_bad_inputs_one_line_error), centroids with a
missing file / wrong schema / no rows (tests/pipelines/test_centroids.py). The centroids job
(Ray) is exercised in test_ray_jobs.py.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.vectors import (
    VectorFileError,
    centroids_schema,
    embeddings_schema,
    make_centroids_table,
)
from index.ann.build import BuildConfig, build_index
from pipelines import build_index as build_job
from pipelines import evaluate as evaluate_job
from pipelines import query as query_job
from pipelines._cli import run_main
from tests.index.index_data import clustered, write_vectors

DIM = 16


def cli(mod, argv, capsys):
    """Run a job's main as its __main__ does: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_main(mod.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def raw_embeddings(path, x, *, item_ids=None, image_ids=None, model="m1", dim=None, split="query",
                   list_size=None):
    """Write an embeddings file bypassing the table helpers' checks (that is the point):
    any values, a metadata dim that may disagree with the column's list size."""
    n = len(x)
    dim = dim or x.shape[1]
    size = list_size or x.shape[1]
    sch = embeddings_schema(dim, model)
    # all nullable: a null item_id must reach the job, not be stopped by the writer
    fields = [f.with_nullable(True) for f in list(sch)[:4]] + [pa.field("embedding", pa.list_(pa.float32(), size))]
    t = pa.Table.from_arrays(
        [pa.array(image_ids or [f"{split}/{i:05d}.jpg" for i in range(n)], pa.string()),
         pa.array(item_ids or [str(i // 2) for i in range(n)], pa.string()),
         pa.array([i % 3 + 1 for i in range(n)], pa.int32()), pa.array([split] * n, pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).reshape(-1)), size)],
        schema=pa.schema(fields, metadata=sch.metadata))
    pq.write_table(t, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vec")
    write_vectors(tmp / "gallery.parquet", clustered(120, DIM, seed=1))
    build_index(str(tmp / "gallery.parquet"), str(tmp / "idx"), "g", BuildConfig(shards=2, index_type="flat"))
    return tmp


def bad_files(tmp):
    """name -> (path, expected words in the error) for one bad query/gallery file each."""
    q = clustered(10, DIM, seed=3)
    inf = q.copy()
    inf[4, 1] = np.inf
    ninf = q.copy()
    ninf[2, 0] = -np.inf
    zero = q.copy()
    zero[5] = 0.0
    files = {
        "inf": (raw_embeddings(tmp / "inf.parquet", inf), ["inf"]),
        "-inf": (raw_embeddings(tmp / "ninf.parquet", ninf), ["inf"]),
        "zero vector": (raw_embeddings(tmp / "zero.parquet", zero), ["normalised"]),
        "unnormalised": (raw_embeddings(tmp / "big.parquet", q * 3), ["normalised"]),
        "metadata dim lies": (raw_embeddings(tmp / "lie.parquet", clustered(10, 8), dim=DIM), ["dim"]),
        "null item_id": (raw_embeddings(tmp / "nullitem.parquet", q, item_ids=["a", None] * 5), ["item_id", "null"]),
        "not parquet": (tmp / "junk.parquet", ["not readable as Parquet"]),
        "no metadata": (tmp / "nometa.parquet", ["metadata"]),
        "empty directory": (tmp / "emptydir", []),
    }
    (tmp / "junk.parquet").write_bytes(b"PAR1 this is not parquet at all")
    pq.write_table(pq.read_table(tmp / "inf.parquet").replace_schema_metadata(None), tmp / "nometa.parquet")
    (tmp / "emptydir").mkdir(exist_ok=True)
    return files


CASES = ["inf", "-inf", "zero vector", "unnormalised", "metadata dim lies", "null item_id", "not parquet",
         "no metadata", "empty directory"]


@pytest.mark.parametrize("case", CASES)
def test_build_index_refuses(world, tmp_path, capsys, case):
    path, needles = bad_files(tmp_path)[case]
    root = world / "idx"
    before = (root / "g" / "CURRENT").read_text()
    versions = sorted(os.listdir(root / "g"))
    code, _, err = cli(build_job, ["--vectors", path, "--root", root, "--name", "g", "--index-type", "flat"], capsys)
    assert_one_line_error(code, err, *needles)
    assert (root / "g" / "CURRENT").read_text() == before and sorted(os.listdir(root / "g")) == versions


@pytest.mark.parametrize("case", [c for c in CASES if c != "null item_id"])  # queries need no item_id
def test_query_refuses(world, tmp_path, capsys, case):
    path, needles = bad_files(tmp_path)[case]
    out = tmp_path / "res"
    out.mkdir()
    (out / "keep.txt").write_text("previous results")
    code, _, err = cli(query_job, ["--index", world / "idx" / "g", "--queries", path, "--k", 3, "--out", out], capsys)
    assert_one_line_error(code, err, *needles)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "previous results"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("side", ["query", "gallery"])
def test_evaluate_refuses(world, tmp_path, capsys, case, side):
    path, needles = bad_files(tmp_path)[case]
    good = world / "gallery.parquet"
    out = tmp_path / "report.json"
    out.write_text("previous report")
    q, g = (path, good) if side == "query" else (good, path)
    code, _, err = cli(evaluate_job, ["--query", q, "--gallery", g, "--out", out], capsys)
    assert_one_line_error(code, err, *needles)
    assert out.read_text() == "previous report"


def test_query_with_a_centroids_file_or_an_index_of_another_model(world, tmp_path, capsys):
    write_vectors(tmp_path / "c.parquet", clustered(5, DIM), kind="centroids")
    code, _, err = cli(query_job, ["--index", world / "idx" / "g", "--queries", tmp_path / "c.parquet", "--k", 3,
                                   "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "embeddings file")
    write_vectors(tmp_path / "m2.parquet", clustered(5, DIM), model="m2")
    code, _, err = cli(query_job, ["--index", world / "idx" / "g", "--queries", tmp_path / "m2.parquet", "--k", 3,
                                   "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "m2", "m1")
    assert not (tmp_path / "o").exists()


def test_query_empty_query_file_is_an_error(world, tmp_path, capsys):
    empty = raw_embeddings(tmp_path / "empty.parquet", np.zeros((0, DIM), np.float32))
    code, _, err = cli(query_job, ["--index", world / "idx" / "g", "--queries", empty, "--k", 3,
                                   "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "no quer")
    assert not (tmp_path / "o").exists()


def test_empty_vector_files_for_build_and_evaluate(world, tmp_path, capsys):
    empty = raw_embeddings(tmp_path / "empty.parquet", np.zeros((0, DIM), np.float32))
    code, _, err = cli(build_job, ["--vectors", empty, "--root", tmp_path / "r", "--name", "n"], capsys)
    assert_one_line_error(code, err, "no vectors")
    code, _, err = cli(evaluate_job, ["--query", empty, "--gallery", world / "gallery.parquet",
                                      "--out", tmp_path / "r.json"], capsys)
    assert_one_line_error(code, err, "empty")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r" / "n" / "CURRENT").exists()


def _mixed(tmp_path, dim=8, model="m1"):
    """A directory of two vector files that disagree: dimension (dim != DIM) or model."""
    (tmp_path / "mixed").mkdir()
    write_vectors(tmp_path / "mixed" / "a.parquet", clustered(10, DIM), prefix="a")
    write_vectors(tmp_path / "mixed" / "b.parquet", clustered(10, dim), prefix="b", model=model)
    return tmp_path / "mixed"


MIXED = {"dimensions": ({"dim": 8}, "dim 8"), "models": ({"dim": DIM, "model": "m2"}, "model m2")}


@pytest.mark.parametrize("case", list(MIXED))
def test_directory_of_disagreeing_files_is_refused(world, tmp_path, capsys, case):
    """Files of another dimension (was an ArrowTypeError traceback) or another model (was read as
    the first file's model) in one directory: one line for build_index, query and evaluate."""
    kwargs, needle = MIXED[case]
    mixed = _mixed(tmp_path, **kwargs)
    code, _, err = cli(build_job, ["--vectors", mixed, "--root", tmp_path / "r", "--name", "n"], capsys)
    assert_one_line_error(code, err, "files disagree", needle)
    assert not (tmp_path / "r" / "n" / "CURRENT").exists()
    code, _, err = cli(query_job, ["--index", world / "idx" / "g", "--queries", mixed, "--k", 3,
                                   "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "files disagree", needle)
    assert not (tmp_path / "o").exists()
    for q, g in ((mixed, world / "gallery.parquet"), (world / "gallery.parquet", mixed)):
        code, _, err = cli(evaluate_job, ["--query", q, "--gallery", g, "--out", tmp_path / "r.json"], capsys)
        assert_one_line_error(code, err, "files disagree", needle)
    assert not (tmp_path / "r.json").exists()


# ---- an item with no images -------------------------------------------------------------------

def test_centroids_table_refuses_an_item_with_no_images():
    x = clustered(2, DIM)
    with pytest.raises(VectorFileError, match="item 'b' has 0 images"):
        make_centroids_table(["a", "b"], x, [3, 0], [[1], []], "m1")


def _centroids_with_empty_item(path):
    x = clustered(3, DIM)
    t = pa.Table.from_arrays(
        [pa.array(["a", "b", "c"]), pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM),
         pa.array([3, 0, 2], pa.int32()), pa.array([[1], [], [2]], pa.list_(pa.int32()))],
        schema=centroids_schema(DIM, "m1"))
    pq.write_table(t, path)
    return path


def test_build_index_refuses_a_centroid_of_no_images(tmp_path, capsys):
    path = _centroids_with_empty_item(tmp_path / "c.parquet")
    code, _, err = cli(build_job, ["--vectors", path, "--root", tmp_path / "r", "--name", "n"], capsys)
    assert_one_line_error(code, err, "'b'")
    assert not (tmp_path / "r" / "n" / "CURRENT").exists()
