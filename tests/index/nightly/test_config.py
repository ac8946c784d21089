"""ReindexConfig rejects bad values where it is built (no .check() to forget)."""
import pytest

from index.nightly.runner import ReindexConfig

BASE = {"work": "w", "index_root": "r", "name": "n", "validation": "v.parquet", "model_id": "m"}


@pytest.mark.parametrize("bad, message", [
    ({"keep": 0}, "--keep must be >= 1"),
    ({"shards": 0}, "--shards must be >= 1"),
    ({"max_drop": 1.5}, "--max-drop must be in"),
    ({"target_recall": 0}, "--target-recall must be in"),
    ({"max_shrink": -0.1}, "--max-shrink must be in"),
    ({"max_error_fraction": 2}, "--max-error-fraction must be in"),
    ({"gate_k": 0}, "--gate-k must be >= 1"),
    ({"rerank_graph": -2}, "--rerank-graph must be >= 0"),
    ({"index_kind": "images"}, "index kind must be one of"),
    ({"kill_after": "lunch"}, "kill_after must be one of"),
    ({"work": "s3://bucket/work"}, "--work must be a local or mounted directory"),
])
def test_bad_values_are_refused_on_construction(bad, message):
    with pytest.raises(ValueError, match=message):
        ReindexConfig(**{**BASE, **bad})


def test_good_values_build():
    cfg = ReindexConfig(**BASE, shards=2, index_kind="embeddings")
    assert cfg.build_key() == {"index_kind": "embeddings", "shards": 2, "index_type": "auto",
                               "target_recall": 0.95}
    # a stored rerank graph is part of what a version is built with: changing it rebuilds
    assert ReindexConfig(**BASE, rerank_graph=32).build_key()["rerank_graph"] == 32
