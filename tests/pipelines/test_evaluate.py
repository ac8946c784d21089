import json
import subprocess
import sys

import numpy as np
import pytest

from contracts.vectors import make_embeddings_table, write_table_atomic
from index.evaluation import metrics as M
from tests.index.evaluation.test_metrics import random_reid

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def run_evaluate(*args):
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, check=False)


def write_embeddings(path, vectors, items, cams, split, model="m1"):
    ids = [f"{split}/{i:05d}.jpg" for i in range(len(vectors))]
    table = make_embeddings_table(ids, np.asarray(items).astype(str), cams, [split] * len(ids), vectors, model)
    write_table_atomic(table, str(path))


@pytest.fixture
def embedding_files(tmp_path):
    rng = np.random.default_rng(11)
    q, qi, qc, g, gi, gc = random_reid(rng)
    write_embeddings(tmp_path / "q.parquet", q, qi, qc, "query")
    write_embeddings(tmp_path / "g.parquet", g, gi, gc, "gallery")
    return tmp_path, (q, qi, qc, g, gi, gc)


def test_evaluate_cli_writes_contract_report(embedding_files):
    tmp, (q, qi, qc, g, gi, gc) = embedding_files
    out = tmp / "reports" / "report.json"
    r = run_evaluate("--query", tmp / "q.parquet", "--gallery", tmp / "g.parquet", "--out", out, "--chunk", "9")
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"mode", "rerank", "num_queries", "num_valid_queries", "mAP", "mINP", "cmc"}
    assert report["mode"] == "instance" and report["rerank"] is None
    assert list(report["cmc"]) == ["1", "5", "10", "20", "50"]
    codes = M.encode_labels(qi.astype(str), gi.astype(str), qc, gc)
    expected = M.summarize(M.evaluate_instances(q, g, codes))
    assert report["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    assert "mAP" in r.stdout


def test_evaluate_cli_both_modes(embedding_files):
    tmp, _ = embedding_files
    out = tmp / "both.json"
    r = run_evaluate("--query", tmp / "q.parquet", "--gallery", tmp / "g.parquet", "--mode", "both", "--out", out)
    assert r.returncode == 0, r.stderr
    reports = json.loads(out.read_text())
    assert [x["mode"] for x in reports] == ["instance", "centroid"]
    # centroids aggregate each identity: on this clustered data they rank the true item first more often
    assert reports[1]["cmc"]["1"] >= reports[0]["cmc"]["1"] - 0.2


def test_evaluate_bad_inputs_one_line_error(embedding_files):
    tmp, (q, qi, qc, _g, _gi, _gc) = embedding_files
    out = tmp / "r.json"
    out.write_text("previous")
    # missing file
    r = run_evaluate("--query", tmp / "nope.parquet", "--gallery", tmp / "g.parquet", "--out", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope.parquet" in r.stderr
    # NaN in the query
    bad = q.copy()
    bad[3, 0] = np.nan
    import pyarrow.parquet as pq

    from contracts.vectors import embeddings_to_arrow
    t = pq.read_table(tmp / "q.parquet")
    t = t.set_column(t.schema.get_field_index("embedding"), t.schema.field("embedding"), embeddings_to_arrow(bad))
    pq.write_table(t, tmp / "nan.parquet")
    r = run_evaluate("--query", tmp / "nan.parquet", "--gallery", tmp / "g.parquet", "--out", out)
    assert r.returncode == 2 and "NaN" in r.stderr and r.stderr.count("\n") == 1
    # other model
    write_embeddings(tmp / "other.parquet", q, qi, qc, "query", model="m2")
    r = run_evaluate("--query", tmp / "other.parquet", "--gallery", tmp / "g.parquet", "--out", out)
    assert r.returncode == 2 and "model" in r.stderr
    # other dimension
    q8 = q[:, :8] / np.linalg.norm(q[:, :8], axis=1, keepdims=True)
    write_embeddings(tmp / "d8.parquet", q8, qi, qc, "query")
    r = run_evaluate("--query", tmp / "d8.parquet", "--gallery", tmp / "g.parquet", "--out", out)
    assert r.returncode == 2 and "dimension" in r.stderr
    # empty query split
    r = run_evaluate("--query", tmp / "q.parquet", "--query-split", "train", "--gallery", tmp / "g.parquet",
                     "--out", out)
    assert r.returncode == 2 and "empty" in r.stderr
    # not an embeddings file
    pq.write_table(t.drop_columns(["embedding"]), tmp / "labels.parquet")
    r = run_evaluate("--query", tmp / "labels.parquet", "--gallery", tmp / "g.parquet", "--out", out)
    assert r.returncode == 2 and "embedding" in r.stderr
    # unknown option value
    r = run_evaluate("--query", tmp / "q.parquet", "--gallery", tmp / "g.parquet", "--out", out, "--mode", "x")
    assert r.returncode == 2
    assert out.read_text() == "previous"  # nothing already written was lost
