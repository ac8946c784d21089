"""RerankConfig is checked on construction; the one chain serves flat and index-backed searches."""
import argparse

import numpy as np
import pytest

from index.rerank.chain import RerankConfig, rerank
from index.rerank.neighbours import flat_search_fn
from pipelines._rerank import add_rerank_arguments, rerank_config


@pytest.mark.parametrize("kwargs, msg", [
    ({"methods": ("kreciprocl",)}, "unknown re-ranking method 'kreciprocl'"),
    ({"methods": ("aqe", "alpha-qe")}, "one of aqe and alpha-qe"),
    ({"methods": ()}, "methods is empty"),
    ({"methods": "kreciprocl,aqe"}, "unknown re-ranking method 'kreciprocl'"),
    ({"k1": 0}, "k1 and k2"),
    ({"k2": 0}, "k1 and k2"),
    ({"lambda_value": 1.5}, "lambda_value"),
    ({"qe_n": -1}, "qe_n"),
    ({"alpha": -1.0}, "alpha"),
    ({"topk": 0}, "topk"),
    ({"candidates": 0}, "candidates"),
    ({"diffusion_alpha": 1.0}, "diffusion_alpha"),
    ({"diffusion_gamma": 0.0}, "diffusion_gamma"),
    ({"max_distance": "far"}, "max_distance"),
    ({"max_distance": -2.0}, "max_distance"),
])
def test_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg) as e:
        RerankConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_config_reads_max_distance_text_as_a_number():
    assert RerankConfig(max_distance="2.5").max_distance == 2.5
    assert RerankConfig(max_distance="sample").max_distance == "sample"


def test_cli_defaults_are_the_dataclass_fields_and_errors_name_flags():
    p = argparse.ArgumentParser()
    add_rerank_arguments(p)
    assert rerank_config("none", p.parse_args([])) == RerankConfig()
    with pytest.raises(ValueError, match="--diffusion-alpha must be in"):
        rerank_config("diffusion", p.parse_args(["--diffusion-alpha", "1"]))
    with pytest.raises(ValueError, match="--dba-alpha"):
        rerank_config("dba", p.parse_args(["--dba-alpha", "-1"]))


def test_flat_and_index_backed_chain_agree():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((300, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[:20] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    keep = np.arange(300) % 9 != 0
    for methods in (("aqe",), ("kreciprocal",), ("dba", "alpha-qe", "kreciprocal"), ("diffusion",)):
        cfg = RerankConfig(methods=methods, topk=15, k1=8, k2=3, diffusion_k=6)
        flat = rerank(q, g, cfg, keep)
        # after DBA the index's lists are re-scored; with every row a candidate that is exact
        indexed = rerank(q, g, cfg, keep, search=flat_search_fn(g), rescore_factor=300)
        assert keep[flat.ids].all() and flat.ids.shape == (20, 15)
        np.testing.assert_array_equal(flat.ids, indexed.ids)
