"""The gallery's stored neighbour graph: merged union lists equal the union search's, and
k-reciprocal with the graph equals k-reciprocal without it (exact searches)."""
import numpy as np
import pytest

from index.rerank.graph import (
    GalleryGraph,
    build_gallery_graph,
    load_gallery_graph,
    save_gallery_graph,
    union_neighbours,
)
from index.rerank.kreciprocal import k_reciprocal_sparse
from index.rerank.neighbours import flat_search_fn, self_first, union_search_fn


def clustered(n_q, n_g, d=24, items=40, seed=0):
    """Look-alike groups: queries near their item's gallery rows, some queries crowded."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(items, d))
    gi = rng.integers(0, items, n_g)
    qi = rng.integers(0, items, n_q)
    g = centres[gi] + 0.7 * rng.normal(size=(n_g, d))
    q = centres[qi] + 0.7 * rng.normal(size=(n_q, d))
    q[:5] = g[:5] + 0.01 * rng.normal(size=(5, d))  # near-duplicates of gallery rows
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return norm(q), norm(g)


def graph_of(g, k, sample=None, batch=37):
    return build_gallery_graph((g[s:s + batch] for s in range(0, len(g), batch)), flat_search_fn(g), k, sample)


@pytest.mark.parametrize("n_q,n_g,cand,block", [(30, 300, 40, 1 << 16), (120, 200, 25, 37), (300, 60, 21, 7)])
def test_union_neighbours_equal_the_union_search(n_q, n_g, cand, block):
    q, g = clustered(n_q, n_g)
    k = 21
    graph = graph_of(g, 32)
    cs, ci = flat_search_fn(g)(q, cand)
    stats = {}
    got = union_neighbours(graph, q, g, cs, ci, k, stats=stats, block=block)
    x = np.concatenate([q, g])
    _, want = union_search_fn(q, flat_search_fn(g))(x, k)
    want = self_first(want, np.arange(len(x)))
    np.testing.assert_array_equal(got, want)
    assert stats["graph_rows_short"] == 0


def test_queries_that_crowd_a_row_are_found():
    # many queries right next to one gallery row: they push its own neighbours out of its list
    q, g = clustered(30, 200)
    rng = np.random.default_rng(3)
    q = np.concatenate([q, g[7] + 0.02 * rng.normal(size=(25, g.shape[1])).astype(np.float32)])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    graph = graph_of(g, 30)
    cs, ci = flat_search_fn(g)(q, 21)
    got = union_neighbours(graph, q, g, cs, ci, 21)
    x = np.concatenate([q, g])
    _, want = union_search_fn(q, flat_search_fn(g))(x, 21)
    np.testing.assert_array_equal(got, self_first(want, np.arange(len(x))))
    assert (got[len(q) + 7, 1:] < len(q)).sum() >= 20  # row 7's list is mostly queries


def test_restricted_graph_lists_refilled_from_the_gallery_search():
    q, g = clustered(40, 250)
    keep = np.ones(len(g), bool)
    keep[::3] = False  # junk: a third of the rows, so many graph lists lose entries
    rows = np.flatnonzero(keep)
    graph = graph_of(g, 24).restrict(rows)
    kept = g[rows]
    assert graph.ids.max() < len(rows) and (graph.ids[:, 0] == np.arange(len(rows))).all()
    cs, ci = flat_search_fn(kept)(q, 30)
    stats = {}
    got = union_neighbours(graph, q, kept, cs, ci, 21, flat_search_fn(kept), stats)
    x = np.concatenate([q, kept])
    _, want = union_search_fn(q, flat_search_fn(kept))(x, 21)
    np.testing.assert_array_equal(got, self_first(want, np.arange(len(x))))
    assert stats["graph_rows_short"] > 0


@pytest.mark.parametrize("max_distance", [4.0, "search"])
def test_k_reciprocal_with_the_graph_equals_without(max_distance):
    q, g = clustered(60, 400)
    plain = k_reciprocal_sparse(q, g, topk=50, max_distance=max_distance)
    with_graph = k_reciprocal_sparse(q, g, topk=50, max_distance=max_distance,
                                     neighbour_graph=graph_of(g, 32))
    np.testing.assert_array_equal(with_graph.ids, plain.ids)
    np.testing.assert_allclose(with_graph.distances, plain.distances, atol=1e-6)


def test_sampled_normalisers_close_to_the_plain_form():
    q, g = clustered(60, 400)
    sample = g[np.random.default_rng(0).choice(len(g), 200, replace=False)]
    plain = k_reciprocal_sparse(q, g, topk=50, max_distance="sample")
    with_graph = k_reciprocal_sparse(q, g, topk=50, max_distance="sample",
                                     neighbour_graph=graph_of(g, 32, sample=sample))
    # different samples, same estimator: the top of each list agrees almost everywhere
    assert (with_graph.ids[:, :5] == plain.ids[:, :5]).mean() > 0.95


def test_graph_of_another_gallery_is_refused():
    q, g = clustered(20, 100)
    with pytest.raises(ValueError, match="100"):
        k_reciprocal_sparse(q, g, neighbour_graph=graph_of(g[:90], 32))
    with pytest.raises(ValueError, match="keeps 8 neighbours"):
        cs, ci = flat_search_fn(g)(q, 30)
        union_neighbours(graph_of(g, 8), q, g, cs, ci, 21)


def test_save_and_load(tmp_path):
    _, g = clustered(5, 80)
    graph = graph_of(g, 10)
    path = str(tmp_path / "graph.npz")
    save_gallery_graph(graph, path)
    back = load_gallery_graph(path)
    np.testing.assert_array_equal(back.ids, graph.ids)
    np.testing.assert_array_equal(back.sims, graph.sims)
    np.testing.assert_array_equal(back.far, graph.far)
    assert back.far_mode == "search" and [p.name for p in tmp_path.iterdir()] == ["graph.npz"]
    (tmp_path / "bad.npz").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="bad.npz: not a gallery graph"):
        load_gallery_graph(str(tmp_path / "bad.npz"))


def test_inconsistent_graph_is_refused():
    with pytest.raises(ValueError, match="do not agree"):
        GalleryGraph(np.zeros((3, 2), np.int64), np.zeros((3, 3), np.float32), np.zeros(3), "search")
    with pytest.raises(ValueError, match="far_mode"):
        GalleryGraph(np.zeros((3, 2), np.int64), np.zeros((3, 2), np.float32), np.zeros(3), "exact")


def test_candidates_searched_ahead_give_the_same_lists():
    """query.py searches the queries' candidates, closes the index, then re-ranks: the chain
    with candidates given ahead (and no index search left) equals the chain searching itself."""
    from index.rerank.chain import (
        FlatBackend,
        IndexBackend,
        PreparedGallery,
        RerankConfig,
        search_query_candidates,
    )

    q, g = clustered(50, 300)
    keep = np.ones(len(g), bool)
    keep[::7] = False  # junk rows: the stored graph is restricted, some lists come out short
    config = RerankConfig(methods=("kreciprocal",), topk=40, k1=12, k2=4, max_distance="search")
    graph = graph_of(g, 16)
    calls = []

    def index_search(x, k):
        calls.append(len(x))
        return flat_search_fn(g)(x, k)

    plain = PreparedGallery(g, config, IndexBackend(index_search), keep, graph).rerank(q)
    ahead = search_query_candidates(q, index_search, config, keep)
    calls.clear()
    got = PreparedGallery(g, config, FlatBackend(), keep, graph).rerank(q, ahead)
    assert calls == []  # the "index" is not searched again
    np.testing.assert_array_equal(got.ids, plain.ids)
    np.testing.assert_allclose(got.distances, plain.distances, atol=1e-6)
    with pytest.raises(ValueError, match="expected \\(50, >= "):
        PreparedGallery(g, config, FlatBackend(), keep, graph).rerank(q, (ahead[0][:, :5], ahead[1][:, :5]))
    qe = RerankConfig(methods=("aqe", "kreciprocal"), topk=40, k1=12, k2=4)
    with pytest.raises(ValueError, match="without query expansion"):
        search_query_candidates(q, index_search, qe, keep)
