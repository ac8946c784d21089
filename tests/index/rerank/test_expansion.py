"""Query expansion (AQE, alpha-QE) and database-side augmentation (DBA)."""
import numpy as np
import pytest

from index.evaluation import metrics as M
from index.rerank.expansion import (
    augment_database,
    database_augmentation,
    expand_queries,
    expansion_weights,
    query_expansion,
    weighted_expansion,
)
from index.rerank.neighbours import flat_search_fn


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n_query, n_gallery, dim=32, n_items=100, noise=1.1, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_items, dim))
    qi = rng.integers(0, n_items, n_query)
    gi = rng.integers(0, n_items, n_gallery)
    q = unit(centres[qi] + noise * rng.standard_normal((n_query, dim)))
    g = unit(centres[gi] + noise * rng.standard_normal((n_gallery, dim)))
    return q, g, qi, gi


def mean_ap(q, g, qi, gi):
    codes = M.encode_labels(qi.astype(str), gi.astype(str))
    return M.summarize(M.evaluate_instances(q, g, codes))["mAP"]


def test_aqe_is_the_normalised_mean_of_query_and_top_n():
    q, g, _, _ = clustered(20, 300)
    out = query_expansion(q, g, n=3)
    assert out.shape == q.shape and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    top = np.argsort(-(q @ g.T), axis=1)[:, :3]
    manual = unit(q + g[top].sum(axis=1))
    np.testing.assert_allclose(out, manual, atol=1e-5)


def test_alpha_qe_weights_and_alpha_zero_is_aqe():
    q, g, _, _ = clustered(20, 300, seed=1)
    np.testing.assert_allclose(query_expansion(q, g, n=4, alpha=0.0), query_expansion(q, g, n=4), atol=1e-6)
    out = query_expansion(q, g, n=4, alpha=3.0)
    sims = q @ g.T
    top = np.argsort(-sims, axis=1)[:, :4]
    w = np.maximum(np.take_along_axis(sims, top, axis=1), 0) ** 3
    manual = unit(q + np.einsum("qk,qkd->qd", w, g[top]))
    np.testing.assert_allclose(out, manual, atol=1e-5)
    # a large alpha keeps the query close to itself when neighbours are not near duplicates
    far = query_expansion(q, g, n=4, alpha=50.0)
    assert np.all(np.sum(far * q, axis=1) > np.sum(query_expansion(q, g, n=4) * q, axis=1) - 1e-6)


def test_weights_ignore_missing_and_negative():
    w = expansion_weights(np.array([[0.5, -0.2, 0.9]]), np.array([[3, 4, -1]]), alpha=2.0)
    np.testing.assert_allclose(w, [[0.25, 0.0, 0.0]])
    w0 = expansion_weights(np.array([[0.5, -0.2, 0.9]]), np.array([[3, 4, -1]]), alpha=0.0)
    np.testing.assert_allclose(w0, [[1.0, 1.0, 0.0]])
    base = unit(np.array([[1.0, 0.0]]))
    vecs = unit(np.array([[0.0, 1.0], [1.0, 1.0]]))
    # missing neighbours (-1) contribute nothing
    np.testing.assert_allclose(weighted_expansion(base, vecs, np.array([[-1, -1]]), np.ones((1, 2))), base)
    with pytest.raises(ValueError, match="do not match"):
        weighted_expansion(base, vecs, np.array([[0, 1]]), np.ones((1, 3)))


def test_n_zero_is_identity():
    q, g, _, _ = clustered(5, 50)
    np.testing.assert_allclose(query_expansion(q, g, n=0), q, atol=1e-6)
    np.testing.assert_allclose(database_augmentation(g, n=0), g, atol=1e-6)


def test_dba_drops_self_and_merges_pairs():
    # well separated pairs: each vector's nearest other vector is its twin, so DBA with n=1
    # makes both members of a pair the same vector, normalise(a + b)
    rng = np.random.default_rng(4)
    centres = unit(rng.standard_normal((40, 64)))
    a = unit(centres + 0.05 * rng.standard_normal(centres.shape))
    b = unit(centres + 0.05 * rng.standard_normal(centres.shape))
    g = np.concatenate([a, b])
    out = database_augmentation(g, n=1)
    assert out.shape == g.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[:40], out[40:], atol=1e-5)
    np.testing.assert_allclose(out[:40], unit(a + b), atol=1e-5)
    # chunking does not change the result; a list without self still gives n others
    np.testing.assert_allclose(database_augmentation(g, n=1, chunk=7), out, atol=1e-6)
    twins = np.concatenate([np.arange(40, 80), np.arange(40)])[:, None]
    np.testing.assert_allclose(augment_database(g, twins, np.ones((80, 1), np.float32), n=1), out, atol=1e-5)


def test_expand_queries_from_given_lists():
    q, g, _, _ = clustered(10, 100, seed=2)
    ids = np.tile(np.array([[5, 7, -1]]), (10, 1))
    scores = np.full((10, 3), 0.5, np.float32)
    out = expand_queries(q, g, ids, scores, n=3, alpha=1.0)
    np.testing.assert_allclose(out, unit(q + 0.5 * g[5] + 0.5 * g[7]), atol=1e-5)


def test_qe_and_dba_raise_map_on_clustered_data():
    q, g, qi, gi = clustered(200, 2000, seed=3)
    base = mean_ap(q, g, qi, gi)
    search = flat_search_fn(g)
    aqe = mean_ap(query_expansion(q, g, n=3, search_fn=search), g, qi, gi)
    aqe_alpha = mean_ap(query_expansion(q, g, n=5, alpha=3.0, search_fn=search), g, qi, gi)
    g_dba = database_augmentation(g, n=3, search_fn=search)
    dba = mean_ap(q, g_dba, qi, gi)
    both = mean_ap(query_expansion(q, g_dba, n=3), g_dba, qi, gi)
    assert aqe > base + 0.01
    assert aqe_alpha > base + 0.01
    assert dba > base + 0.01
    assert both > max(aqe, dba)


def test_weighted_expansion_chunks_by_bytes_not_rows():
    """The gathered (rows, k, D) block is bounded by bytes: a tiny budget (one chunk per 16
    rows) gives the same result as one chunk."""
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((50, 64)).astype(np.float32)
    base = rng.standard_normal((40, 64)).astype(np.float32)
    ids = rng.integers(-1, 50, (40, 4))
    w = rng.random((40, 4)).astype(np.float32)
    np.testing.assert_allclose(weighted_expansion(base, vecs, ids, w, budget=1),
                               weighted_expansion(base, vecs, ids, w), atol=1e-6)
