"""Neighbour-search backends: every re-ranking step gets its neighbour lists from a SearchFn.

- `flat_search_fn`: exact inner product over an array (faiss.knn, no copy of it);
- `union_search_fn`: a search over [query; gallery] from a search over the gallery (k-reciprocal);
- `filtered_search_fn`: a search over the kept rows only (junk left out);
- `rescored_search_fn`: a search over changed vectors (DBA) through the candidates of a search
  over the original ones (the sharded index);
- `self_first`: neighbour lists with each point itself first.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["SearchFn", "filtered_search_fn", "flat_search_fn", "rescored_search_fn", "self_first", "union_search_fn"]

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""search_fn(x (n, D) float32, k) -> (scores (n, k) float32 inner products, higher is nearer;
ids (n, k) int64 row numbers in the searched set, -1 where fewer than k were found)."""


def flat_search_fn(vectors: np.ndarray, batch: int = 8192) -> SearchFn:
    """Exact inner-product search over `vectors` (n, D) float32 with faiss.knn: the same lists
    as a faiss.IndexFlatIP, without the index's copy of the vectors (1.5 GB at 300,000 x 1280,
    held beside the caller's for the whole re-ranking)."""
    import faiss

    base = np.ascontiguousarray(vectors, np.float32)  # no copy when it already is

    def search(x: np.ndarray, k: int):
        k = min(k, len(base))
        scores = np.empty((len(x), k), np.float32)
        ids = np.empty((len(x), k), np.int64)
        for s in range(0, len(x), batch):
            scores[s:s + batch], ids[s:s + batch] = faiss.knn(x[s:s + batch], base, k,
                                                              metric=faiss.METRIC_INNER_PRODUCT)
        return scores, ids

    return search


def union_search_fn(query: np.ndarray, gallery_search: SearchFn) -> SearchFn:
    """A search over the union [query; gallery] from a search over the gallery alone (e.g. the
    sharded gallery index): the queries are searched exactly, ids >= Q are gallery row + Q."""
    q_search = flat_search_fn(query)
    n_q = len(query)

    def search(x: np.ndarray, k: int):
        qs, qi = q_search(x, k)
        gs, gi = gallery_search(x, k)
        scores = np.concatenate([qs, gs], axis=1)
        ids = np.concatenate([qi, np.where(gi >= 0, gi + n_q, -1)], axis=1)
        scores = np.where(ids >= 0, scores, -np.inf)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, axis=1), np.take_along_axis(ids, top, axis=1)

    return search


def filtered_search_fn(search: SearchFn, keep: np.ndarray, growth: int = 4) -> SearchFn:
    """A search over the kept rows only, from a search over all G rows.

    search(x, k) -> (scores, ids) over G rows; keep: (G,) bool. The returned search answers
    with ids renumbered 0..K-1 in kept order (K = keep.sum()), -1 / -inf where fewer than k
    kept rows exist. Rows whose list the filter leaves short are searched again with
    `growth` times more neighbours until full or the whole gallery was listed."""
    keep = np.asarray(keep, bool)
    g = len(keep)
    new_id = np.full(g, -1, np.int64)
    new_id[keep] = np.arange(int(keep.sum()))
    n_keep = int(keep.sum())

    def search_kept(x: np.ndarray, k: int):
        k = max(1, min(k, n_keep))
        out_s = np.full((len(x), k), -np.inf, np.float32)
        out_i = np.full((len(x), k), -1, np.int64)
        todo = np.arange(len(x))
        fetch = min(g, k + max(16, k))
        while len(todo):
            sc, ids = search(np.ascontiguousarray(x[todo], np.float32), fetch)
            sc, ids = np.asarray(sc, np.float32), np.asarray(ids, np.int64)
            mapped = np.where(ids >= 0, new_id[np.maximum(ids, 0)], -1)
            ok = mapped >= 0
            order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # kept entries first, in rank order
            got = np.take_along_axis(ok, order, axis=1)
            done = (got.sum(axis=1) >= k) | (fetch >= g) | (ids[:, -1] < 0)
            rows = todo[done]
            out_i[rows] = np.where(got, np.take_along_axis(mapped, order, axis=1), -1)[done]
            out_s[rows] = np.where(got, np.take_along_axis(sc, order, axis=1), -np.inf)[done]
            todo = todo[~done]
            fetch = min(g, fetch * growth)
        return out_s, out_i

    return search_kept


def rescored_search_fn(search: SearchFn, vectors: np.ndarray, factor: int = 4) -> SearchFn:
    """Search over `vectors` (n, D) float32 (e.g. DBA-augmented gallery) using the candidates of
    `search` (a search over the original vectors with the same row numbers): factor * k
    candidates per query, re-scored by inner product with `vectors` and re-sorted."""
    n = len(vectors)

    def search_new(x: np.ndarray, k: int):
        k = max(1, min(k, n))
        x = np.asarray(x, np.float32)
        _, cand = search(x, min(n, factor * k))
        cand = np.asarray(cand, np.int64)
        ok = cand >= 0
        s = np.empty(cand.shape, np.float32)
        # gather the candidates' vectors a block of rows at a time (<= ~64 MB of gathered vectors)
        step = max(1, (64 << 20) // max(1, cand.shape[1] * vectors.shape[1] * 4))
        for a in range(0, len(x), step):
            b = min(a + step, len(x))
            s[a:b] = np.einsum("qd,qkd->qk", x[a:b], vectors[np.maximum(cand[a:b], 0)])
        s = np.where(ok, s, -np.inf).astype(np.float32)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(np.where(ok, cand, -1), top, axis=1)
        return np.take_along_axis(s, top, axis=1), ids

    return search_new


def self_first(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Neighbour lists with the point itself at position 0, as an exact ranking has it (an
    approximate index may miss it, and duplicates may come before it)."""
    is_self = ids == rows[:, None]
    order = np.argsort(~is_self, axis=1, kind="stable")
    out = np.take_along_axis(ids, order, axis=1)
    missing = ~is_self.any(axis=1)
    out[missing] = np.concatenate([rows[missing, None], ids[missing, :-1]], axis=1)
    return out
