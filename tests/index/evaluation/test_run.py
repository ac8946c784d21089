"""evaluate_tables / evaluate_files: the mode x re-ranking loop as library code (no Ray, no subprocess)."""
import numpy as np
import pytest

from contracts.vectors import make_embeddings_table, read_vectors, write_table_atomic
from index.evaluation.protocol import make_report, per_query_metrics
from index.evaluation.run import evaluate_files, evaluate_tables
from index.rerank.chain import RerankConfig


def _tables(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 8)).astype(np.float32)
    items = np.repeat(np.arange(12), 5)
    x = centres[items] + 0.4 * rng.standard_normal((60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    split = np.where(np.arange(60) % 5 == 0, "query", "gallery")
    t = make_embeddings_table([f"i{i}" for i in range(60)], [str(i) for i in items],
                              [int(c) for c in np.arange(60) % 5], list(split), x, model="m")
    path = str(tmp_path / "emb.parquet")
    write_table_atomic(t, path)
    return path


def test_loop_gives_one_report_per_mode_and_config(tmp_path):
    path = _tables(tmp_path)
    configs = [None, RerankConfig(methods=("kreciprocal",), k1=4, k2=2), RerankConfig(methods=("aqe",), qe_n=2)]
    run = evaluate_files(path, path, ["instance", "centroid"], configs, "query", "gallery", pictures=True, samples=3)
    assert [(r["mode"], r["rerank"]) for r in run.reports] == [
        (m, n) for m in ("instance", "centroid") for n in (None, "kreciprocal", "aqe")]
    assert run.reports[1]["rerank_form"] == "dense" and run.reports[1]["rerank_params"]["k1"] == 4
    assert len(run.curves) == 6 and all(len(rows) == 3 for rows in run.ranked.values())
    # without re-ranking the loop reports exactly what the protocol computes
    q = read_vectors(path, kind="embeddings", split="query")
    g = read_vectors(path, kind="embeddings", split="gallery")
    plain = evaluate_tables(q, g, ["instance"], [None])
    assert plain.reports == [make_report(per_query_metrics(q, g, "instance"), "instance")]
    assert plain.curves == {} and plain.ranked == {}  # no pictures asked for


def test_bad_chunk_is_refused(tmp_path):
    path = _tables(tmp_path)
    with pytest.raises(ValueError, match="chunk"):
        evaluate_files(path, path, ["instance"], [None], "query", "gallery", chunk=0)
