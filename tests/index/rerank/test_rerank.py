"""k-reciprocal re-ranking: exact form vs a hand-checked case and a slow loop implementation of
the published algorithm; sparse form vs exact; memory scaling of the sparse form."""
import tracemalloc

import numpy as np
import pytest

from index.evaluation import metrics as M
from index.rerank.chain import RerankConfig, rerank
from index.rerank.kreciprocal import (
    expansion_weights,
    k_reciprocal_exact,
    k_reciprocal_from_embeddings,
    k_reciprocal_sparse,
    local_query_expansion,
)
from index.rerank.neighbours import flat_search_fn, union_search_fn


def slow_reference(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """The published algorithm (Zhong et al. 2017, person-re-ranking code) as plain loops over
    dense matrices: no shared code with index.rerank.kreciprocal."""
    q = q_g_dist.shape[0]
    full = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
    dist = np.power(full, 2).astype(np.float32)
    dist = np.transpose(dist / np.max(dist, axis=0))
    n = dist.shape[0]
    rank = np.argsort(dist, axis=1, kind="stable")

    def recip(i, k):
        return np.array([j for j in rank[i, :k + 1] if i in rank[j, :k + 1]], dtype=np.int64)

    v = np.zeros((n, n), np.float32)
    half = int(np.around(k1 / 2.0))
    for i in range(n):
        r = recip(i, k1)
        members = list(r)
        for c in r:
            rc = recip(c, half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                members.extend(rc)
        members = np.unique(members)
        w = np.exp(-dist[i, members])
        v[i, members] = w / np.sum(w)
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.zeros((q, n), np.float32)
    for i in range(q):
        t = np.minimum(v[i][None, :], v).sum(axis=1)
        jac[i] = 1 - t / (2.0 - t)
    return (jac * (1 - lambda_value) + dist[:q] * lambda_value)[:, q:]


def clustered(n_query, n_gallery, dim=32, n_items=None, noise=0.9, seed=0):
    """Unit vectors around item centres; returns query, gallery, query_items, gallery_items."""
    rng = np.random.default_rng(seed)
    n_items = n_items or max(2, n_gallery // 8)
    centres = rng.standard_normal((n_items, dim))
    qi = rng.integers(0, n_items, n_query)
    gi = rng.integers(0, n_items, n_gallery)

    def sample(items):
        x = centres[items] + noise * rng.standard_normal((len(items), dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return sample(qi), sample(gi), qi, gi


def euclid(a, b, same=False):
    d = np.maximum(2.0 - 2.0 * (a.astype(np.float64) @ b.T.astype(np.float64)), 0.0)
    if same:
        np.fill_diagonal(d, 0.0)
    return np.sqrt(d)


def mean_ap(scores, qi, gi):
    codes = M.encode_labels(qi.astype(str), gi.astype(str))
    return M.summarize(M.metrics_from_scores(scores, codes, np.arange(len(scores))))["mAP"]


# ------------------------------------------------------------------------------- exact form
def test_hand_checked_case():
    # 1-D points: query at 0, gallery at 1 and 3; k1=1 (so round(k1/2)=0), k2=1, lambda=0.3.
    qg = np.array([[1.0, 3.0]])
    qq = np.array([[0.0]])
    gg = np.array([[0.0, 2.0], [2.0, 0.0]])
    # squared distances divided by each point's largest: q [0, 1/9, 1], g1 [1/4, 0, 1]
    # R(q)={q,g1}, R(g1)={g1,q}, R(g2)={g2} (g1's two nearest are g1 and q)
    vq = np.array([1.0, np.exp(-1 / 9)]) / (1 + np.exp(-1 / 9))  # V[q] over (q, g1)
    vg1 = np.array([np.exp(-1 / 4), 1.0]) / (1 + np.exp(-1 / 4))  # V[g1] over (q, g1)
    t = np.minimum(vq, vg1).sum()
    expected = np.array([[0.7 * (1 - t / (2 - t)) + 0.3 / 9, 0.7 * 1.0 + 0.3 * 1.0]])
    got = k_reciprocal_exact(qg, qq, gg, k1=1, k2=1, lambda_value=0.3)
    assert got.dtype == np.float32 and got.shape == (1, 2)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got[0, 0], 0.14886, atol=1e-4)  # worked out by hand
    np.testing.assert_allclose(slow_reference(qg, qq, gg, 1, 1, 0.3), expected, atol=1e-6)


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (5, 1, 0.5), (7, 3, 0.0), (3, 2, 1.0), (4, 4, 0.1)])
def test_exact_matches_slow_reference(k1, k2, lam):
    q, g, _, _ = clustered(40, 260, seed=k1)
    qg, qq, gg = euclid(q, g), euclid(q, q, True), euclid(g, g, True)
    got = k_reciprocal_exact(qg, qq, gg, k1, k2, lam)
    ref = slow_reference(qg, qq, gg, k1, k2, lam)
    assert got.shape == (40, 260)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert np.abs(got - ref).max() < 1e-5


def test_exact_accepts_non_euclidean_and_float32_inputs():
    rng = np.random.default_rng(3)
    qg = rng.uniform(0.1, 2, (15, 60)).astype(np.float32)
    qq = rng.uniform(0.1, 2, (15, 15)).astype(np.float32)
    gg = rng.uniform(0.1, 2, (60, 60)).astype(np.float32)
    np.fill_diagonal(qq, 0)
    np.fill_diagonal(gg, 0)  # not symmetric: the column normalisation and transpose matter
    np.testing.assert_allclose(k_reciprocal_exact(qg, qq, gg, 6, 3, 0.3),
                               slow_reference(qg, qq, gg, 6, 3, 0.3), atol=1e-5)


def test_from_embeddings_and_junk_mask():
    q, g, _, _ = clustered(30, 200, seed=5)
    got = k_reciprocal_from_embeddings(q, g, 10, 4, 0.3)
    np.testing.assert_allclose(got, slow_reference(euclid(q, g), euclid(q, q, True), euclid(g, g, True),
                                                   10, 4, 0.3), atol=1e-4)
    keep = np.ones(200, bool)
    keep[::7] = False
    masked = k_reciprocal_from_embeddings(q, g, 10, 4, 0.3, gallery_keep=keep)
    assert np.isinf(masked[:, ~keep]).all()
    # junk takes no part: the same as a gallery without it
    np.testing.assert_allclose(masked[:, keep], k_reciprocal_from_embeddings(q, g[keep], 10, 4, 0.3),
                               atol=1e-6)
    assert not np.allclose(masked[:, keep], got[:, keep], atol=1e-4)  # the union did change


def test_exact_rejects_bad_input():
    with pytest.raises(ValueError, match="disagree"):
        k_reciprocal_exact(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_exact(np.ones((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)), k1=0)
    with pytest.raises(ValueError, match="lambda"):
        k_reciprocal_exact(np.ones((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)), lambda_value=2)


# ------------------------------------------------------------------------------ sparse form
@pytest.fixture(scope="module")
def agreement_data():
    q, g, qi, gi = clustered(150, 2850, dim=32, n_items=300, noise=1.0, seed=11)
    exact = k_reciprocal_from_embeddings(q, g)
    return q, g, qi, gi, exact


def test_sparse_matches_exact_on_a_few_thousand_points(agreement_data):
    q, g, qi, gi, exact = agreement_data
    res = k_reciprocal_sparse(q, g, topk=100)
    assert res.ids.shape == (150, 100) and res.distances.dtype == np.float32
    assert res.certified.all()
    top = np.argsort(exact, axis=1, kind="stable")[:, :100]
    # same lists, same distances (rare swaps of near-ties aside)
    assert (res.ids == top).all(axis=1).mean() > 0.95
    np.testing.assert_allclose(res.distances, np.take_along_axis(exact, top, axis=1), atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(exact, res.ids, axis=1), res.distances, atol=1e-5)
    # mAP: the whole exact ranking vs the sparse top-100 lists (the rest ranked last)
    exact_map = mean_ap(-exact, qi, gi)
    sparse_map = mean_ap(res.dense_scores(len(g)), qi, gi)
    plain_map = mean_ap(q @ g.T, qi, gi)
    assert abs(sparse_map - exact_map) < 0.005
    truncated = np.full_like(exact, -np.inf)
    np.put_along_axis(truncated, top, -np.take_along_axis(exact, top, axis=1), axis=1)
    assert abs(sparse_map - mean_ap(truncated, qi, gi)) < 1e-3  # same lists, same numbers
    assert exact_map > plain_map + 0.02  # re-ranking helps on clustered data
    # an estimated row normaliser (farthest of a sample) barely moves the result
    sampled = k_reciprocal_sparse(q, g, topk=100, max_distance="sample")
    assert abs(mean_ap(sampled.dense_scores(len(g)), qi, gi) - exact_map) < 0.005


def test_sparse_with_approximate_neighbours_stays_close(agreement_data):
    import faiss

    q, g, qi, gi, exact = agreement_data
    x = np.concatenate([q, g])
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.nprobe = 16  # recall@21 about 0.95 here; at nprobe 4 (recall 0.65) mAP drops ~10 points
    res = k_reciprocal_sparse(q, g, topk=100, search_fn=lambda v, k: index.search(np.ascontiguousarray(v), k))
    assert abs(mean_ap(res.dense_scores(len(g)), qi, gi) - mean_ap(-exact, qi, gi)) < 0.005


def test_sparse_union_search_and_junk(agreement_data):
    q, g = agreement_data[0][:40], agreement_data[1][:900]
    base = k_reciprocal_sparse(q, g, 10, 4, topk=20)
    via_union = k_reciprocal_sparse(q, g, 10, 4, topk=20, search_fn=union_search_fn(q, flat_search_fn(g)))
    np.testing.assert_allclose(via_union.distances, base.distances, atol=1e-6)
    keep = np.ones(len(g), bool)
    keep[1::5] = False
    res = k_reciprocal_sparse(q, g, 10, 4, topk=20, gallery_keep=keep)
    assert keep[res.ids].all()  # ids number the gallery as given, junk never returned
    exact = k_reciprocal_from_embeddings(q, g, 10, 4, gallery_keep=keep)
    np.testing.assert_allclose(res.distances, np.sort(exact, axis=1)[:, :20], atol=1e-5)


def test_sparse_constant_normaliser_and_short_lists():
    q, g, _, _ = clustered(5, 12, seed=2)
    res = k_reciprocal_sparse(q, g, 4, 2, topk=20, max_distance=4.0)
    # only 12 gallery items: the rest of each list is padding
    assert (res.ids[:, :12] >= 0).all() and (res.ids[:, 12:] == -1).all()
    assert np.isinf(res.distances[:, 12:]).all() and res.certified.all()
    assert (np.diff(res.distances[:, :12], axis=1) >= 0).all()
    with pytest.raises(ValueError, match="same D"):
        k_reciprocal_sparse(q, g[:, :3])
    bad = g.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_from_embeddings(q, bad)
    with pytest.raises(ValueError, match="empty"):
        k_reciprocal_sparse(q, g[:0])


def test_sparse_memory_scales_linearly():
    """V has at most (k1+1)(round(k1/2)+2) entries a row before and k2 times that after local
    query expansion, whatever N; the traced peak of numpy allocations grows about linearly."""
    k1, k2 = 20, 6
    peaks, per_row = [], []
    for n in (1000, 4000):
        q, g, _, _ = clustered(n // 10, n - n // 10, dim=32, seed=n)
        x = np.concatenate([q, g])
        _, ids = flat_search_fn(x)(x, k1 + 1)

        def pair_dist(a, b, x=x):  # normalised by the bound 4 on squared distances
            return (2 - 2 * np.einsum("ij,ij->i", x[a], x[b])) / 4.0

        v = expansion_weights(ids, pair_dist, k1)
        assert len(v.data) <= n * (k1 + 1) * (int(np.around(k1 / 2)) + 2)
        vqe = local_query_expansion(v, ids, k2)
        assert len(vqe.data) <= k2 * len(v.data)
        np.testing.assert_allclose(np.add.reduceat(vqe.data, vqe.indptr[:-1]), 1.0, atol=1e-5)
        per_row.append(len(vqe.data) / n)
        tracemalloc.start()
        k_reciprocal_sparse(q, g, k1, k2, topk=50)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert per_row[1] < 2 * per_row[0]  # entries per row do not grow with N
    assert peaks[1] < 8 * peaks[0]  # 4x the points: far below the 16x of a dense matrix


# ------------------------------------------------------------------------- configuration
def test_parse_methods():
    assert RerankConfig.parse_methods("kreciprocal, alpha-qe") == ("kreciprocal", "alpha-qe")
    assert RerankConfig.parse_methods("") == ("none",)
    for bad, msg in (("kreciprocal,foo", "unknown"), ("aqe,alpha-qe", "one of"), ("none,dba", "none")):
        with pytest.raises(ValueError, match=msg):
            RerankConfig.parse_methods(bad)


def test_rerank_combinations(agreement_data):
    q, g, qi, gi, _ = agreement_data
    q, g, qi, gi = q[:60], g[:1200], qi[:60], gi[:1200]
    plain = rerank(q, g, RerankConfig(methods=("none",), topk=30))
    top = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :30]
    assert (plain.ids == top).mean() > 0.99
    kr = rerank(q, g, RerankConfig(methods=("kreciprocal",), topk=30))
    np.testing.assert_allclose(kr.distances, k_reciprocal_sparse(q, g, topk=30).distances, atol=1e-6)
    keep = gi % 7 != 0
    both = rerank(q, g, RerankConfig(methods=("dba", "alpha-qe", "kreciprocal"), topk=30),
                  gallery_keep=keep)
    assert both.ids.shape == (60, 30) and keep[both.ids].all()
    assert (np.diff(both.distances, axis=1) >= 0).all()
    assert RerankConfig(methods=("aqe",)).as_dict()["methods"] == ("aqe",)


def test_certified_only_where_the_list_is_exact(agreement_data):
    q, g = agreement_data[0][:60], agreement_data[1][:1500]
    exact = k_reciprocal_from_embeddings(q, g, 10, 4)
    top = np.sort(exact, axis=1)[:, :40]
    few = k_reciprocal_sparse(q, g, 10, 4, topk=40, candidates=11)  # too few candidates to prove
    assert not few.certified.all()
    np.testing.assert_allclose(few.distances[few.certified], top[few.certified], atol=1e-5)
    # with an approximate search that returns short lists, nothing is certified (the
    # candidates come from the gallery search, the union's lists give the neighbourhoods)
    def short(search):
        def cut(x, k):
            s, i = search(x, k)
            i[:, -1] = -1
            return s, i
        return cut

    res = k_reciprocal_sparse(q, g, 10, 4, topk=40, search_fn=short(flat_search_fn(np.concatenate([q, g]))),
                              gallery_search_fn=short(flat_search_fn(g)))
    assert not res.certified.any()


def test_auto_max_distance_searches_small_sets_and_samples_large_ones():
    from index.rerank.kreciprocal import AUTO_SEARCH_MAX, resolve_max_distance

    assert resolve_max_distance("auto", AUTO_SEARCH_MAX) == "search"
    assert resolve_max_distance("auto", AUTO_SEARCH_MAX + 1) == "sample"
    assert resolve_max_distance(4.0, 10**7) == 4.0 and resolve_max_distance("search", 10**7) == "search"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    stats = {}
    k_reciprocal_sparse(x[:5], x[5:], 4, 2, 0.3, topk=10, stats=stats)
    assert stats["max_distance"] == "search"   # small: the reference's exact normaliser


def test_pair_dots_and_farthest_sample_chunk_by_bytes():
    """Memory bounded by a byte budget (a fixed row count held 1.3 GB at D=1280); the chunked
    results equal the one-shot ones."""
    from index.rerank.kreciprocal import _pair_dots, farthest_in_sample

    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 96)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = rng.integers(0, 300, 1000), rng.integers(0, 300, 1000)
    np.testing.assert_allclose(_pair_dots(x, a, b, budget=1), np.einsum("ij,ij->i", x[a], x[b]), atol=1e-6)
    np.testing.assert_allclose(farthest_in_sample(x, 50, budget=1), farthest_in_sample(x, 50), atol=1e-6)
