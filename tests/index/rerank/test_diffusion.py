import numpy as np
import pytest

from index.rerank.diffusion import (
    DiffusionError,
    PrecomputedDiffusion,
    build_graph,
    conjugate_gradient,
    diffuse,
    diffuse_precomputed,
    diffuse_truncated,
    merge_precomputed,
    precompute_diffusion,
    query_vector_block,
)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn(q, g, k):
    """Exact cosine top-k lists: (ids (Q, k), sims (Q, k)), best first."""
    s = q @ g.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, axis=1)


def dense_reference(ids, sims, gamma, mutual):
    """S = D^-1/2 A D^-1/2 built with plain loops over the neighbour lists (Iscen et al.)."""
    n = len(ids)
    w = np.zeros((n, n))
    listed = np.zeros((n, n), bool)
    for i in range(n):
        for j, s in zip(ids[i], sims[i]):
            if j >= 0 and j != i:
                listed[i, j] = True
                w[i, j] = max(s, 0.0) ** gamma
    a = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if mutual and listed[i, j] and listed[j, i]:
                a[i, j] = (w[i, j] + w[j, i]) / 2
            elif not mutual and (listed[i, j] or listed[j, i]):
                a[i, j] = (w[i, j] + w[j, i]) / 2 if listed[i, j] and listed[j, i] else max(
                    w[i, j], w[j, i])
    d = a.sum(axis=1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    return a * inv[:, None] * inv[None, :]


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    g = unit(rng.normal(size=(60, 8)) + 2 * rng.normal(size=(6, 8))[rng.integers(0, 6, 60)])
    q = unit(g[:5] + 0.3 * rng.normal(size=(5, 8)))
    return g, q


@pytest.mark.parametrize("mutual", [True, False])
def test_graph_matches_dense_reference(small, mutual):
    g, _ = small
    ids, sims = knn(g, g, 8)                  # includes each vector itself: dropped
    graph = build_graph(ids, sims, gamma=3.0, mutual=mutual)
    ref = dense_reference(ids, sims, 3.0, mutual)
    dense = graph.to_dense()
    assert np.allclose(dense, ref, atol=1e-12)
    assert np.allclose(dense, dense.T) and np.all(np.diag(dense) == 0)
    x = np.random.default_rng(1).normal(size=(60, 3))
    assert np.allclose(graph.matvec(x), ref @ x) and np.allclose(graph.matvec(x[:, 0]), ref @ x[:, 0])


def test_cg_and_online_diffusion_match_dense_solve(small):
    g, q = small
    alpha, gamma = 0.9, 3.0
    ids, sims = knn(g, g, 10)
    graph = build_graph(ids, sims, gamma)
    s_ref = dense_reference(ids, sims, gamma, True)
    qids, qsims = knn(q, g, 20)
    y = query_vector_block(qids, qsims, 60, gamma, k=5)
    f_ref = np.linalg.solve(np.eye(60) - alpha * s_ref, y)
    f = conjugate_gradient(graph, y, alpha, tol=1e-12, maxiter=500)
    assert np.allclose(f, f_ref, atol=1e-9)
    scores, top = diffuse(graph, qids, qsims, topk=15, alpha=alpha, gamma=gamma, query_k=5,
                          tol=1e-12, maxiter=500, block=2, dtype=np.float64)
    assert scores.shape == (5, 15) and top.dtype == np.int64 and scores.dtype == np.float32
    for i in range(5):
        order = np.argsort(-f_ref[:, i], kind="stable")[:15]
        assert np.allclose(scores[i], f_ref[order, i], rtol=1e-5)
        assert set(top[i][:10]) == set(order[:10])
        assert np.all(np.diff(scores[i]) <= 0)


def test_precomputed_offline_online_equals_online(small, tmp_path):
    g, q = small
    alpha = 0.95
    ids, sims = knn(g, g, 10)
    graph = build_graph(ids, sims)
    qids, qsims = knn(q, g, 10)
    exact = precompute_diffusion(graph, alpha, keep=60, tol=1e-12, maxiter=500, block=16,
                                 dtype=np.float64)
    y = query_vector_block(qids, qsims, 60, 3.0, k=10)
    f_ref = np.linalg.solve(np.eye(60) - alpha * graph.to_dense(), y)
    s1, i1 = diffuse_precomputed(exact, qids, qsims, topk=20, query_k=10, block=3)
    for i in range(5):
        order = np.argsort(-f_ref[:, i], kind="stable")[:20]
        assert np.allclose(s1[i], f_ref[order, i], rtol=1e-5)
        assert set(i1[i][:15]) == set(order[:15])
    # truncated rows (Yang et al.'s sparsification) keep the head of the ranking
    small_keep = precompute_diffusion(graph, alpha, keep=20, tol=1e-8, maxiter=200,
                                      dtype=np.float64)
    _, i2 = diffuse_precomputed(small_keep, qids, qsims, topk=5, query_k=10)
    overlap = np.mean([len(set(i2[i]) & set(i1[i][:5])) / 5 for i in range(5)])
    assert overlap >= 0.8
    # float32 solver (the default) ranks the same; row shares merge into the whole
    f32 = precompute_diffusion(graph, alpha, keep=20, tol=1e-8, maxiter=200, block=7)
    assert np.mean(f32.ids == small_keep.ids) > 0.95
    assert np.allclose(f32.values, small_keep.values, atol=1e-4)
    parts = [precompute_diffusion(graph, alpha, keep=20, tol=1e-8, maxiter=200, rows=r)
             for r in (np.arange(0, 60, 2), np.arange(1, 60, 2))]
    merged = merge_precomputed(parts)
    assert np.mean(merged.ids == f32.ids) > 0.99 and np.allclose(merged.values, f32.values, atol=1e-6)
    with pytest.raises(DiffusionError, match="overlap"):
        merge_precomputed([parts[0], parts[0]])
    path = tmp_path / "diff.npz"
    small_keep.save(str(path))
    back = PrecomputedDiffusion.load(str(path))
    assert np.array_equal(back.ids, small_keep.ids) and back.alpha == alpha


def test_truncated_diffusion_matches_dense_subgraph_solve(small):
    g, q = small
    alpha, gamma, m = 0.95, 3.0, 25
    ids, sims = knn(g, g, 10)
    graph = build_graph(ids, sims, gamma)
    a_full = dense_reference(ids, sims, gamma, True)
    deg = np.zeros(60)
    for i in range(60):     # the graph's affinity A = S * sqrt(d_i d_j), from the reference
        deg[i] = sum(max(s_, 0) ** gamma for j, s_ in zip(ids[i], sims[i]) if j != i and i in ids[j])
    qids, qsims = knn(q, g, m)
    scores, top = diffuse_truncated(graph, qids, qsims, topk=m, alpha=alpha, gamma=gamma,
                                    query_k=5, tol=1e-13, maxiter=1000, block=2,
                                    dtype=np.float64)
    for i in range(len(q)):
        nodes = qids[i]
        a = (a_full * np.sqrt(np.outer(deg, deg)))[np.ix_(nodes, nodes)]   # induced subgraph
        d = a.sum(axis=1)
        inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
        s_sub = a * inv[:, None] * inv[None, :]                           # re-normalised
        y = np.zeros(m)
        y[:5] = np.maximum(qsims[i, :5], 0) ** gamma
        f = np.linalg.solve(np.eye(m) - alpha * s_sub, y)
        order = np.argsort(-f, kind="stable")
        n_pos = int((f > 0).sum())
        assert np.allclose(scores[i, :n_pos], f[order[:n_pos]], rtol=1e-6)
        assert set(top[i, :n_pos]) == set(nodes[f > 0]) and set(top[i]) <= set(nodes) | {-1}
    # with every gallery vector in each list, truncation changes nothing
    full_ids, full_sims = knn(q, g, 60)
    s_all, i_all = diffuse_truncated(graph, full_ids, full_sims, topk=20, alpha=alpha,
                                     query_k=5, tol=1e-13, maxiter=1000, dtype=np.float64)
    s_ref, i_ref = diffuse(graph, full_ids, full_sims, topk=20, alpha=alpha, query_k=5,
                           tol=1e-13, maxiter=1000, dtype=np.float64)
    assert np.allclose(s_all, s_ref, rtol=1e-6)
    assert np.mean(i_all == i_ref) > 0.95     # only near-ties may swap


def test_diffusion_follows_the_manifold():
    # two concentric rings: a query on the inner ring should get the inner ring's far side
    # ranked above the outer ring's points right next to it, which distance ranking cannot do.
    # The outer points list inner ones among their 6 nearest, but not the other way round, so
    # the mutual-kNN graph (Iscen et al.) separates the manifolds and diffusion follows them.
    # The graph takes any similarity in [0, 1]: here exp(-d^2 / s^2) of Euclidean distance.
    t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
    pts = np.r_[np.c_[np.cos(t), np.sin(t)], 1.3 * np.c_[np.cos(t), np.sin(t)]]
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(axis=2)
    ids = np.argsort(d2, axis=1, kind="stable")[:, :6]
    sims = np.exp(-np.take_along_axis(d2, ids, axis=1) / 0.05)
    assert np.any(ids[80:] < 80)                      # cross-ring neighbours in the lists...
    graph = build_graph(ids, sims, gamma=1.0)
    rows = np.repeat(np.arange(160), np.diff(graph.indptr))
    assert not np.any((rows < 80) & (graph.indices >= 80))  # ...are not mutual
    _, top = diffuse(graph, ids[:1], sims[:1], topk=80, alpha=0.99, query_k=3, maxiter=300,
                     tol=1e-10)
    # the whole top-80 is the inner ring, the diametrically opposite point included
    assert sorted(top[0]) == list(range(80))
    assert np.mean(ids_by_distance(d2[0], 60) < 80) < 0.6   # distance ranking mixes rings


def ids_by_distance(d2_row, k):
    return np.argsort(d2_row, kind="stable")[:k]


def test_bad_inputs_and_padding():
    ids = np.array([[1, -1], [0, -1], [0, 1]])        # -1: FAISS "no neighbour"
    sims = np.array([[0.9, -np.inf], [0.9, np.nan], [0.5, 0.5]])
    graph = build_graph(ids, sims, mutual=True)
    assert graph.n == 3 and graph.nnz == 2            # only the mutual pair 0-1
    assert graph.degree[2] == 0
    with pytest.raises(DiffusionError, match="out of range"):
        build_graph(np.array([[5]]), np.array([[0.5]]))
    with pytest.raises(DiffusionError, match="NaN"):
        build_graph(np.array([[1], [0]]), np.array([[np.nan], [0.5]]))
    with pytest.raises(DiffusionError, match=r"\(rows, k\)"):
        build_graph(np.zeros((3, 2), int), np.zeros((3, 3)))
    with pytest.raises(DiffusionError, match="alpha"):
        conjugate_gradient(graph, np.ones(3), alpha=1.0)
    # a query with no usable neighbour gets an empty (padded) list, others are unaffected
    scores, top = diffuse(graph, np.array([[-1, -1], [0, 1]]), np.array([[0.0, 0.0], [0.8, 0.7]]),
                          topk=3, query_k=None)
    assert np.all(top[0] == -1) and np.all(np.isneginf(scores[0]))
    assert set(top[1][:2]) == {0, 1} and top[1][2] == -1


# ---- diffusion as a re-ranking method (index.rerank.backends / index.evaluation.reranked) ---------------

def _dense_diffusion_f(g, q, k, alpha, gamma, query_k):
    """Reference f (G, Q) from a dense solve on the mutual kNN graph of g."""
    ids, sims = knn(g, g, k + 1)
    s_ref = dense_reference(ids, sims, gamma, True)
    qids, qsims = knn(q, g, query_k)
    y = query_vector_block(qids, qsims, len(g), gamma, k=query_k)
    return np.linalg.solve(np.eye(len(g)) - alpha * s_ref, y)


def test_fill_with_original_completes_lists_in_cosine_order():
    from index.rerank.diffusion import fill_with_original

    scores = np.array([[0.5, 0.2, -np.inf, -np.inf]], np.float32)
    ids = np.array([[3, 1, -1, -1]])
    s, i = fill_with_original(scores, ids, np.array([[1, 7, 3, 5, 6]]))
    assert i.tolist() == [[3, 1, 7, 5]] and np.allclose(s, [[0.5, 0.2, 0.0, 0.0]])


def test_rerank_over_a_search_diffusion_matches_dense_solve(small):
    from index.rerank.backends import result_scores
    from index.rerank.chain import RerankConfig, rerank
    from index.rerank.neighbours import flat_search_fn

    g, q = small
    g, q = g.astype(np.float32), q.astype(np.float32)
    cfg = RerankConfig(methods=("diffusion",), topk=12, diffusion_k=8, diffusion_alpha=0.9,
                       diffusion_query_k=5)
    res = rerank(q, g, cfg, search=flat_search_fn(g))
    f_ref = _dense_diffusion_f(g.astype(np.float64), q.astype(np.float64), 8, 0.9, 3.0, 5)
    scores = result_scores(res, cfg)
    assert res.ids.shape == (5, 12) and (res.ids >= 0).all()
    for r in range(5):
        reached = scores[r] > 0
        want = np.argsort(-f_ref[:, r], kind="stable")[:reached.sum()]
        assert np.allclose(scores[r][reached], f_ref[want, r], rtol=2e-3)
        assert np.all(np.diff(scores[r]) <= 1e-7)        # descending, not-reached (0) last
    # junk rows never come back, ids stay in the caller's numbering
    keep = np.ones(len(g), bool)
    keep[[0, 1, 2]] = False
    res = rerank(q, g, cfg, gallery_keep=keep, search=flat_search_fn(g))
    assert not np.isin(res.ids, [0, 1, 2]).any() and (res.ids >= 0).all()


def test_truncated_form_used_above_full_max(small):
    from index.rerank.diffusion import diffusion_rerank, knn_graph
    from index.rerank.neighbours import flat_search_fn

    g, q = small
    g, q = g.astype(np.float32), q.astype(np.float32)
    search = flat_search_fn(g)
    graph = knn_graph(g, search, 8)
    full = diffusion_rerank(q, g, search, topk=10, k=8, query_k=5, graph=graph)
    # a truncation list as long as the gallery is the whole graph: same ranking
    trunc = diffusion_rerank(q, g, search, topk=10, k=8, query_k=5, truncate=60, full_max=10,
                             graph=graph)
    assert (full[1][:, :5] == trunc[1][:, :5]).mean() > 0.9


def test_evaluate_ranked_diffusion_ranks_by_dense_solve(small):
    from index.evaluation.reranked import _Scorer
    from index.rerank.chain import RerankConfig

    g, q = small
    g, q = g.astype(np.float32), q.astype(np.float32)
    # a sparse graph (k=3) leaves parts of the gallery unreachable from some queries
    cfg = RerankConfig(methods=("diffusion",), diffusion_k=3, diffusion_alpha=0.9, diffusion_query_k=2)
    s = _Scorer(q, g, cfg, keep=None).scores(np.arange(5))
    f_ref = _dense_diffusion_f(g.astype(np.float64), q.astype(np.float64), 3, 0.9, 3.0, 2)
    unreached = 0
    for r in range(5):
        reached = f_ref[:, r] > 1e-12
        unreached += (~reached).sum()
        if (~reached).any():                                       # reached nodes rank first,
            assert s[r][reached].min() > s[r][~reached].max()      # the rest by cosine
            rest = np.flatnonzero(~reached)
            assert np.array_equal(np.argsort(-s[r][rest], kind="stable"),
                                  np.argsort(-(q[r] @ g[rest].T), kind="stable"))
        top = np.argsort(-f_ref[:, r], kind="stable")[:5]
        assert np.argsort(-s[r], kind="stable")[:5].tolist() == top.tolist()
    assert unreached > 0


def test_kreciprocal_and_diffusion_are_exclusive():
    from index.rerank.chain import RerankConfig

    assert RerankConfig.parse_methods("dba,aqe,diffusion") == ("dba", "aqe", "diffusion")
    with pytest.raises(ValueError, match="one of kreciprocal and diffusion"):
        RerankConfig.parse_methods("kreciprocal,diffusion")
