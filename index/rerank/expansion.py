"""Query expansion and database-side augmentation from neighbour lists.

- Average query expansion, AQE (Chum et al., ICCV 2007): a query becomes the mean of itself
  and its top-n gallery vectors.
- alpha-QE (Radenovic et al., TPAMI 2018): the same mean weighted by similarity^alpha (the
  query's own weight is 1 = 1^alpha); alpha = 0 is AQE. Negative similarities weigh 0.
- Database-side augmentation, DBA (Arandjelovic & Zisserman, CVPR 2012): every gallery vector
  becomes the (optionally alpha-weighted) mean of itself and its own top-n gallery neighbours.

Every result is L2-normalised again. The functions take neighbour lists (ids + scores) from a
search function, never a query x gallery matrix, so they scale with the index; the wrappers
build an exact flat search (neighbours.flat_search_fn) when none is given. Combine with k-reciprocal by
re-ranking the expanded vectors (index.rerank.chain.rerank does DBA, then QE, then k-reciprocal or diffusion).
"""
from __future__ import annotations

import numpy as np

from index.rerank.neighbours import SearchFn, flat_search_fn


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def expansion_weights(scores: np.ndarray, ids: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """Weights of neighbours: (n, k) float32, similarity^alpha (similarities clipped at 0),
    1 for every neighbour when alpha == 0, and 0 where ids == -1 (missing)."""
    scores = np.asarray(scores, np.float32)
    if alpha == 0:
        w = np.ones_like(scores)
    else:
        w = np.power(np.maximum(scores, 0.0), np.float32(alpha))
    return np.where(np.asarray(ids) >= 0, w, np.float32(0.0)).astype(np.float32)


def weighted_expansion(base: np.ndarray, vectors: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                       base_weight: float = 1.0, budget: int = 64 << 20) -> np.ndarray:
    """normalise(base_weight * base[i] + sum_j weights[i, j] * vectors[ids[i, j]]).

    base: (n, D) float32; vectors: (m, D) float32; ids: (n, k) int64 rows of `vectors`
    (-1 ignored); weights: (n, k) float32. Returns (n, D) float32 L2-normalised. Works in chunks
    of rows whose gathered (rows, k, D) vectors take about `budget` bytes."""
    base = np.asarray(base, np.float32)
    ids = np.asarray(ids, np.int64)
    if ids.shape[0] != len(base) or np.shape(weights) != ids.shape:
        raise ValueError(f"ids {ids.shape} / weights {np.shape(weights)} do not match base {base.shape}")
    out = np.empty_like(base)
    chunk = max(16, budget // (4 * max(1, ids.shape[1]) * max(1, base.shape[1])))
    for s in range(0, len(base), chunk):
        e = min(s + chunk, len(base))
        w = np.where(ids[s:e] >= 0, weights[s:e], 0).astype(np.float32)
        neigh = vectors[np.maximum(ids[s:e], 0)]  # (c, k, D)
        out[s:e] = np.float32(base_weight) * base[s:e] + np.einsum("ck,ckd->cd", w, neigh)
    return _normalize(out)


def expand_queries(query: np.ndarray, gallery: np.ndarray, ids: np.ndarray, scores: np.ndarray,
                   n: int, alpha: float = 0.0) -> np.ndarray:
    """AQE (alpha == 0) or alpha-QE from neighbour lists.

    query: (Q, D), gallery: (G, D) float32 L2-normalised; ids, scores: (Q, k >= n) the queries'
    gallery neighbours (int64 rows of gallery, float32 inner products), best first.
    Returns (Q, D) float32: normalise(q + sum_{j<n} w_j g_j), w_j = 1 (AQE) or
    max(s_j, 0)^alpha. n == 0 returns the queries unchanged (normalised)."""
    ids, scores = np.asarray(ids)[:, :n], np.asarray(scores)[:, :n]
    return weighted_expansion(query, gallery, ids, expansion_weights(scores, ids, alpha))


def augment_database(gallery: np.ndarray, ids: np.ndarray, scores: np.ndarray, n: int,
                     alpha: float = 0.0, rows: np.ndarray | None = None) -> np.ndarray:
    """DBA from the gallery's own neighbour lists.

    gallery: (G, D) float32 L2-normalised; ids, scores: (R, k) neighbours in the gallery (int64
    rows, float32 inner products, best first) of the gallery rows `rows` (R,) (default all G).
    A vector's own row in its list is dropped: it takes part once, with weight 1.
    Returns (R, D) float32: normalise(g_i + sum of its top-n other neighbours, weighted 1 or
    max(s, 0)^alpha as in expand_queries)."""
    rows = np.arange(len(gallery)) if rows is None else np.asarray(rows, np.int64)
    ids = np.asarray(ids, np.int64)
    scores = np.asarray(scores, np.float32)
    is_self = ids == rows[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # self (if listed) to the end
    ids = np.take_along_axis(ids, order, axis=1)[:, :n]
    scores = np.take_along_axis(scores, order, axis=1)[:, :n]
    ids = np.where(ids == rows[:, None], -1, ids)  # fewer than n others: self must not count twice
    return weighted_expansion(gallery[rows], gallery, ids, expansion_weights(scores, ids, alpha))


def query_expansion(query: np.ndarray, gallery: np.ndarray, n: int = 5, alpha: float = 0.0,
                    search_fn: SearchFn | None = None) -> np.ndarray:
    """AQE / alpha-QE of query (Q, D) against gallery (G, D), float32 L2-normalised.
    search_fn(x, k) -> (scores, ids) searches the gallery (default exact flat inner product).
    Returns (Q, D) float32 L2-normalised expanded queries."""
    if n <= 0:
        return _normalize(np.asarray(query, np.float32))
    search_fn = search_fn or flat_search_fn(gallery)
    scores, ids = search_fn(np.ascontiguousarray(query, np.float32), min(n, len(gallery)))
    return expand_queries(query, gallery, ids, scores, n, alpha)


def database_augmentation(gallery: np.ndarray, n: int = 5, alpha: float = 0.0,
                          search_fn: SearchFn | None = None, chunk: int = 8192) -> np.ndarray:
    """DBA of gallery (G, D) float32 L2-normalised: every vector replaced by the weighted mean of
    itself and its top-n gallery neighbours, then re-normalised. search_fn searches the gallery
    (default exact flat inner product); it is asked for n + 1 neighbours (the vector itself is
    usually the first). Returns (G, D) float32."""
    gallery = np.ascontiguousarray(gallery, np.float32)
    if n <= 0:
        return _normalize(gallery)
    search_fn = search_fn or flat_search_fn(gallery)
    k = min(n + 1, len(gallery))
    out = np.empty_like(gallery)
    for s in range(0, len(gallery), chunk):
        e = min(s + chunk, len(gallery))
        scores, ids = search_fn(gallery[s:e], k)
        out[s:e] = augment_database(gallery, ids, scores, n, alpha, rows=np.arange(s, e))
    return out
