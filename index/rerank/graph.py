"""The gallery's own neighbour graph, built once per index version, for k-reciprocal re-ranking.

k-reciprocal needs every point's k1 + 1 nearest neighbours over the union [queries; gallery].
For the G gallery rows that is a G-point search on every call (at 300,000 images most of the
job's time), although the queries change a gallery row's list only where a query comes
nearer than the row's k-th neighbour. So build_index can store each gallery row's nearest
gallery rows (`GalleryGraph`, `build_gallery_graph`), and at query time `union_neighbours`
merges the queries in:

- the queries' own candidate lists (their nearest gallery rows, searched anyway) give the
  similarity of every (query, gallery row) pair they list; a query that does not list row g
  is no more similar to g than its last candidate;
- so row g's merged list is exact unless some query's last-candidate score reaches g's k-th
  score; those rows are searched exactly against the queries.

With an exact index the merged lists equal the union search's; with an approximate one they are
what the index finds. The graph also keeps each row's largest distance to the gallery (the
row normaliser of the "original distance"), in the mode `resolve_max_distance` picks for G.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from index.rerank.neighbours import SearchFn, flat_search_fn, self_first

__all__ = ["GRAPH_FILE", "GalleryGraph", "build_gallery_graph", "load_gallery_graph",
           "save_gallery_graph", "union_neighbours"]

GRAPH_FILE = "rerank-graph.npz"
FAR_MODES = ("search", "sample")


@dataclass
class GalleryGraph:
    """ids: (G, K) int64 nearest gallery rows of each row, nearest first (the row itself
    included), -1 padding; sims: (G, K) float32 their inner products (-inf padding);
    far: (G,) float32 largest squared distance 2 - 2 cos from each row to the gallery, found
    by `far_mode` ("search": a farthest-point search; "sample": over a random sample)."""

    ids: np.ndarray
    sims: np.ndarray
    far: np.ndarray
    far_mode: str

    def __post_init__(self):
        self.ids = np.asarray(self.ids, np.int64)
        self.sims = np.asarray(self.sims, np.float32)
        self.far = np.asarray(self.far, np.float32)
        if self.ids.ndim != 2 or self.sims.shape != self.ids.shape or self.far.shape != (len(self.ids),):
            raise ValueError(f"gallery graph: ids {self.ids.shape}, sims {self.sims.shape} and far "
                             f"{self.far.shape} do not agree")
        if self.far_mode not in FAR_MODES:
            raise ValueError(f"gallery graph: far_mode must be one of {FAR_MODES}, got {self.far_mode!r}")

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return len(self.ids)

    def restrict(self, rows: np.ndarray) -> GalleryGraph:
        """The graph of the gallery rows `rows` (R,) int64 only (e.g. junk left out), renumbered
        0..R-1 in that order; entries of other rows are dropped (lists may become short)."""
        rows = np.asarray(rows, np.int64)
        new = np.full(len(self), -1, np.int64)
        new[rows] = np.arange(len(rows))
        ids = self.ids[rows]
        mapped = np.where(ids >= 0, new[np.maximum(ids, 0)], -1)
        order = np.argsort(mapped < 0, axis=1, kind="stable")  # kept entries first, rank order kept
        ids = np.take_along_axis(mapped, order, axis=1)
        sims = np.where(ids >= 0, np.take_along_axis(self.sims[rows], order, axis=1), -np.inf)
        return GalleryGraph(ids, sims.astype(np.float32), self.far[rows], self.far_mode)


def build_gallery_graph(batches: Iterable[np.ndarray], search_fn: SearchFn, k: int,
                        sample: np.ndarray | None = None, far_search_fn: SearchFn | None = None
                        ) -> GalleryGraph:
    """The graph of a gallery given as `batches` of its rows in order ((n_b, D) float32,
    L2-normalised) and `search_fn`, an inner-product search over those same rows (row numbers
    as ids). k: neighbours kept per row (the row itself included).
    sample: None finds each row's farthest row by a k=1 search of -x ("search"); an (S, D)
    float32 array of gallery rows takes the largest distance to it instead ("sample").
    far_search_fn: the search for that farthest row (default search_fn; e.g. junk filtered out,
    as k-reciprocal leaves junk out of the union)."""
    if k < 1:
        raise ValueError(f"gallery graph: k must be >= 1, got {k}")
    ids, sims, far = [], [], []
    offset = 0
    for x in batches:
        x = np.ascontiguousarray(x, np.float32)
        s, i = search_fn(x, k)
        i = np.asarray(i, np.int64)
        s = np.where(i >= 0, np.asarray(s, np.float32), -np.inf)
        if i.shape[1] < k:  # a gallery smaller than k
            pad = k - i.shape[1]
            i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
            s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids.append(i)
        sims.append(s.astype(np.float32))
        if sample is None:
            fs, _ = (far_search_fn or search_fn)(-x, 1)
            far.append(2.0 + 2.0 * np.asarray(fs, np.float32)[:, 0])
        else:
            far.append(_farthest_to(x, sample))
        offset += len(x)
    if offset == 0:
        raise ValueError("gallery graph: no vectors")
    return GalleryGraph(np.concatenate(ids), np.concatenate(sims), np.concatenate(far),
                        "search" if sample is None else "sample")


def _farthest_to(x: np.ndarray, sample: np.ndarray, budget: int = 64 << 20) -> np.ndarray:
    """(n,) float32 largest 2 - 2 cos from each row of x to the rows of `sample`."""
    out = np.empty(len(x), np.float32)
    chunk = max(64, budget // (4 * max(1, len(sample))))
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = 2.0 - 2.0 * (x[s:s + chunk] @ sample.T).min(axis=1)
    return out


def save_gallery_graph(graph: GalleryGraph, path: str) -> None:
    """Write the graph to `path` (.npz) under a temporary name, renamed when complete."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, ids=graph.ids, sims=graph.sims, far=graph.far, far_mode=np.array(graph.far_mode))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_gallery_graph(path: str) -> GalleryGraph:
    """Read a graph written by save_gallery_graph; ValueError naming the file if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return GalleryGraph(z["ids"], z["sims"], z["far"], str(z["far_mode"]))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a gallery graph ({str(e).splitlines()[0]})") from None


def _top_by_row(rows: np.ndarray, ids: np.ndarray, sims: np.ndarray, n_rows: int, k: int):
    """Entries (row, id, sim) -> per row its k best ids by sim (ties: lower id first), as
    ((n_rows, k) int64 ids, -1 padding; (n_rows, k) float32 sims, -inf padding)."""
    order = np.lexsort((ids, -sims.astype(np.float64), rows))
    rows, ids, sims = rows[order], ids[order], sims[order]
    starts = np.searchsorted(rows, np.arange(n_rows))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < k
    out_i = np.full((n_rows, k), -1, np.int64)
    out_s = np.full((n_rows, k), -np.inf, np.float32)
    out_i[rows[keep], rank[keep]] = ids[keep]
    out_s[rows[keep], rank[keep]] = sims[keep]
    return out_i, out_s


def _best(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, k: int) -> np.ndarray:
    """Per row, the k ids of the two lists (scores s, ids i, -1 = none) with the highest scores;
    ties keep the first list's entries first."""
    s = np.concatenate([s1, s2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    s = np.where(i >= 0, s, -np.inf)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(i, top, axis=1)


def union_neighbours(graph: GalleryGraph, query: np.ndarray, gallery: np.ndarray,
                     cand_sims: np.ndarray, cand_ids: np.ndarray, k: int,
                     gallery_search_fn: SearchFn | None = None, stats: dict | None = None,
                     block: int = 1 << 16) -> np.ndarray:
    """Neighbour lists over the union U = [query; gallery] from the gallery's graph, as the
    k-reciprocal engine wants them: (Q + G, k) int64 union row numbers (queries 0..Q-1, gallery
    row g is Q + g), each point itself first, -1 padding only where U has fewer than k points.

    graph: the gallery's GalleryGraph (G rows, K >= k); query (Q, D), gallery (G, D) float32;
    cand_sims, cand_ids: (Q, C) each query's nearest gallery rows (C >= k, as a gallery search
    returns them, -1 padding). gallery_search_fn: search over the gallery, used for the rows
    whose graph list lost entries (restrict); needed only then. stats: gets the row counts.
    block: gallery rows merged at a time (memory)."""
    n_q, n_g = len(query), len(gallery)
    if len(graph) != n_g:
        raise ValueError(f"gallery graph has {len(graph)} rows, the gallery {n_g}")
    if graph.k < min(k, n_g):
        raise ValueError(f"gallery graph keeps {graph.k} neighbours per row, {k} are needed")
    cand_ids = np.asarray(cand_ids, np.int64)
    cand_sims = np.where(cand_ids >= 0, np.asarray(cand_sims, np.float32), -np.inf)
    k = min(k, n_q + n_g)
    q_search = flat_search_fn(query)
    out = np.full((n_q + n_g, k), -1, np.int64)

    # queries: the other queries exactly, the gallery from their candidate lists
    qs, qi = q_search(query, k)
    out[:n_q] = _best(qs, qi, cand_sims[:, :k], np.where(cand_ids[:, :k] >= 0, cand_ids[:, :k] + n_q, -1), k)

    # gallery rows: graph entries plus the (query, row) pairs the candidate lists hold
    g_ids, g_sims = graph.ids[:, :max(k, 1)], graph.sims[:, :max(k, 1)]
    ok_g = g_ids >= 0
    ok_c = cand_ids >= 0
    c_g = cand_ids[ok_c]  # the pairs by gallery row, so that each block of rows takes a slice
    c_q = np.repeat(np.arange(n_q), cand_ids.shape[1])[ok_c.ravel()]
    c_s = cand_sims[ok_c]
    order = np.argsort(c_g, kind="stable")
    c_g, c_q, c_s = c_g[order], c_q[order], c_s[order]
    merged = np.full((n_g, k), -1, np.int64)
    merged_s = np.full((n_g, k), -np.inf, np.float32)
    # `block` rows merged at a time: the entries of all rows at once held ~1 GB at 300,000
    for lo in range(0, n_g, block):
        hi = min(lo + block, n_g)
        a, b = np.searchsorted(c_g, [lo, hi])
        ok = ok_g[lo:hi]
        rows = np.concatenate([np.repeat(np.arange(hi - lo), g_ids.shape[1])[ok.ravel()], c_g[a:b] - lo])
        ids = np.concatenate([g_ids[lo:hi][ok] + n_q, c_q[a:b]])
        sims = np.concatenate([g_sims[lo:hi][ok], c_s[a:b]])
        merged[lo:hi], merged_s[lo:hi] = _top_by_row(rows, ids, sims, hi - lo, k)
    del c_g, c_q, c_s, order
    # a query that does not list row g has sim(q, g) <= its last candidate's score
    full = ok_c.all(axis=1) if cand_ids.shape[1] < n_g else np.zeros(n_q, bool)
    last = np.where(full, cand_sims[:, -1], -np.inf)
    # row g is certain when every query whose last score reaches g's k-th lists g itself
    kth = merged_s[:, -1]
    high = len(last) - np.searchsorted(np.sort(last), kth, side="left")  # queries with last >= kth
    c_q = np.repeat(np.arange(n_q), cand_ids.shape[1])[ok_c.ravel()]
    c_g = cand_ids[ok_c]
    listed_high = np.bincount(c_g[last[c_q] >= kth[c_g]], minlength=n_g)
    unsure = np.flatnonzero(high > listed_high)
    short = np.flatnonzero(ok_g.sum(axis=1) < min(k, n_g))  # the graph's list lost entries
    unsure = np.setdiff1d(unsure, short)
    if len(short) and gallery_search_fn is None:
        raise ValueError(f"{len(short)} gallery rows have short graph lists and no gallery search was given")
    step = max(256, (64 << 20) // (4 * max(1, gallery.shape[1])))  # rows gathered at a time (~64 MB)
    for part in (unsure[s:s + step] for s in range(0, len(unsure), step)):
        # exact against the queries, with the graph for the gallery side
        us, ui = q_search(gallery[part], k)
        merged[part] = _best(us, ui, g_sims[part], np.where(g_ids[part] >= 0, g_ids[part] + n_q, -1), k)
    for part in (short[s:s + step] for s in range(0, len(short), step)):
        # the graph lost entries: search the gallery again (and the queries)
        x = gallery[part]
        us, ui = q_search(x, k)
        gs, gi = gallery_search_fn(x, k)
        gi = np.asarray(gi, np.int64)
        got = _best(us, ui, np.asarray(gs, np.float32), np.where(gi >= 0, gi + n_q, -1), k)
        merged[part, :got.shape[1]] = got
    out[n_q:] = merged
    if stats is not None:
        stats["graph_rows_searched"] = len(unsure)
        stats["graph_rows_short"] = len(short)
    return self_first(out, np.arange(n_q + n_g, dtype=np.int64))
