"""Diffusion re-ranking on a kNN graph of the gallery (Iscen, Tolias, Avrithis, Furon, Chum,
"Efficient Diffusion on Region Manifolds", CVPR 2017), in the online form of that paper and the
offline/online form of Yang, Hinami, Matsui, Ly, Satoh, "Efficient Image Retrieval via
Decoupling Diffusion into Online and Offline Processing", AAAI 2019.

Graph (built from neighbour lists, e.g. a FAISS search of the gallery against itself):
    a_ij = max(s_ij, 0)^gamma  if i and j are in each other's k nearest neighbours (mutual),
    S = D^(-1/2) A D^(-1/2),   D = diag(A 1).
Query q with neighbours j (its top-k_q from the index) and similarities s_qj:
    y_j = max(s_qj, 0)^gamma,  and the ranking is by f solving  (I - alpha S) f = y.

- `diffuse`: online, conjugate gradient on the whole graph for a block of queries at a time
  (Iscen et al.; their CG with ~20 iterations). Cost per query ~ iterations x edges.
- `diffuse_truncated`: online, each query on the subgraph of its own top-m index results
  (Iscen et al.'s truncation): cost independent of N, the form for large galleries.
- `precompute_diffusion` + `diffuse_precomputed`: offline, the top-`keep` entries of every
  row of L^-1 = (I - alpha S)^-1 (symmetric, so rows = columns); online,
  f = L^-1 y = sum_j y_j L^-1[j, :] is a sparse sum of k_q stored rows (Yang et al.): no solver
  at query time, cost ~ k_q x keep per query. With keep = N it equals `diffuse` exactly.

Everything is sparse: the graph is CSR arrays built here with numpy (scipy is not a dependency),
solver state is (N, block) for a block of right-hand sides; no N x N matrix is ever formed.
The offline stage costs about N x iterations x edges (one CG per gallery vector, blocked): fine
for centroid galleries and up to ~1e5 images on CPU; beyond that run it in parallel over blocks.

Diffusion composes with query expansion / database augmentation as in Yang et al., Table 1: run
DBA on the gallery vectors before building the neighbour lists, AQE on the queries before
searching them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from index.rerank.neighbours import SearchFn


class DiffusionError(ValueError):
    """Bad diffusion input: mismatched shapes, out-of-range ids, NaN similarities."""


@dataclass(frozen=True)
class Graph:
    """Symmetric normalised affinity S in CSR form over N nodes (self-loops excluded).

    indptr: (N+1,) int64; indices: (nnz,) int64 column ids, sorted within each row;
    data: (nnz,) float64 values of S; degree: (N,) float64 row sums of A (0 = isolated node).
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    degree: np.ndarray

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.indices)

    @cached_property
    def _slots(self) -> list[tuple[np.ndarray | None, np.ndarray, np.ndarray]]:
        """The edges regrouped by their position within their row: slot j holds the j-th
        neighbour of every row that has more than j. Rows are unique within a slot, so a
        matvec is one gather-multiply-add of (rows, Q) per slot instead of an (edges, Q)
        temporary and a segmented sum; `None` rows means all N rows in order."""
        rows = np.repeat(np.arange(self.n), np.diff(self.indptr))
        pos = np.arange(self.nnz) - self.indptr[rows]
        order = np.argsort(pos, kind="stable")
        bounds = np.searchsorted(pos[order], np.arange(pos.max() + 2 if self.nnz else 1))
        slots = []
        for j in range(len(bounds) - 1):
            sel = order[bounds[j]:bounds[j + 1]]
            r = rows[sel]
            slots.append((None if len(r) == self.n else r, self.indices[sel], self.data[sel]))
        return slots

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """S @ x for x: (N,) or (N, Q) float -> same shape and float dtype (float64 default)."""
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        one = x.ndim == 1
        x2 = x[:, None] if one else x
        out = np.zeros((self.n, x2.shape[1]), x2.dtype)
        for rows, cols, w in self._slots:
            term = x2[cols]
            term *= w.astype(x2.dtype, copy=False)[:, None]
            if rows is None:
                out += term
            else:
                out[rows] += term
        return out[:, 0] if one else out

    def to_dense(self) -> np.ndarray:
        """(N, N) float64 — for tests and tiny graphs only."""
        dense = np.zeros((self.n, self.n))
        rows = np.repeat(np.arange(self.n), np.diff(self.indptr))
        dense[rows, self.indices] = self.data
        return dense


def _check_lists(ids: np.ndarray, sims: np.ndarray, n: int | None, what: str):
    ids = np.asarray(ids)
    sims = np.asarray(sims, dtype=np.float64)
    if ids.ndim != 2 or ids.shape != sims.shape:
        raise DiffusionError(f"{what}: ids {ids.shape} and similarities {sims.shape} must both be "
                             "(rows, k)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DiffusionError(f"{what}: ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    valid = ids >= 0                                   # FAISS pads missing neighbours with -1
    if n is not None and (ids[valid] >= n).any():
        raise DiffusionError(f"{what}: neighbour id {int(ids[valid].max())} out of range for "
                             f"{n} gallery vectors")
    if not np.isfinite(sims[valid]).all():
        raise DiffusionError(f"{what}: similarities contain NaN or inf")
    return ids, sims, valid


def build_graph(ids: np.ndarray, sims: np.ndarray, gamma: float = 3.0,
                mutual: bool = True) -> Graph:
    """Affinity graph of N gallery vectors from their neighbour lists.

    ids: (N, k) int neighbour ids into the same N vectors (-1 = none; the vector itself may be
    listed, self-loops are dropped); sims: (N, k) float similarities (cosine). mutual: keep an
    edge only when each end lists the other (Iscen et al.); False keeps the union. The two
    directions' weights are averaged (they differ only by search round-off).
    """
    n = len(ids)
    ids, sims, valid = _check_lists(ids, sims, n, "gallery neighbours")
    if gamma <= 0:
        raise DiffusionError(f"gamma must be > 0, got {gamma}")
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)[valid]
    cols = ids[valid]
    w = np.maximum(sims[valid], 0.0) ** gamma
    keep = (cols != rows) & (w > 0)
    rows, cols, w = rows[keep], cols[keep], w[keep]
    key, w = _dedupe_max(rows * n + cols, w)                 # sorted unique (i, j)
    if not len(key):
        return Graph(np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(n))
    rev = (key % n) * n + key // n
    pos = np.searchsorted(key, rev)
    found = pos < len(key)
    found[found] = key[pos[found]] == rev[found]
    if mutual:
        w = (w[found] + w[pos[found]]) / 2
        key = key[found]
    else:
        w_rev = np.where(found, w[np.minimum(pos, len(key) - 1)], 0.0)
        # an edge listed in one direction only gets that weight in both
        w_sym = np.where(found, (w + w_rev) / 2, w)
        key, w = _dedupe_max(np.concatenate([key, rev[~found]]),
                             np.concatenate([w_sym, w[~found]]))
    return _normalized_graph(key // n, key % n, w, n)


def _normalized_graph(rows: np.ndarray, cols: np.ndarray, w: np.ndarray, n: int) -> Graph:
    """Graph from symmetric affinity edges (i, j, a_ij) sorted by (i, j): S = D^-1/2 A D^-1/2."""
    degree = np.bincount(rows, weights=w, minlength=n)
    inv_sqrt = np.zeros(n)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    data = w * inv_sqrt[rows] * inv_sqrt[cols]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return Graph(indptr, cols.astype(np.int64), data, degree)


def _dedupe_max(key: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys, each with the largest of its weights."""
    order = np.lexsort((-w, key))
    key, w = key[order], w[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    return key[first], w[first]


def conjugate_gradient(graph: Graph, y: np.ndarray, alpha: float = 0.99, tol: float = 1e-6,
                       maxiter: int = 20, dtype=np.float64) -> np.ndarray:
    """Solve (I - alpha S) F = Y column by column (independent CG recurrences, one matvec each
    step for the block). y: (N,) or (N, Q) float -> F of the same shape, `dtype` (float32 is
    ~2x faster and enough for ranking; float64 for exact comparisons).
    A column stops when ||residual|| <= tol * ||y|| and leaves the working block; all stop
    after maxiter steps. I - alpha S is symmetric positive definite for 0 <= alpha < 1
    (eigenvalues of S lie in [-1, 1]), so CG applies.
    """
    if not 0.0 <= alpha < 1.0:
        raise DiffusionError(f"alpha must be in [0, 1), got {alpha}")
    y = np.asarray(y, dtype=dtype)
    one = y.ndim == 1
    b = y[:, None] if one else y
    out = np.zeros_like(b)
    rs = np.einsum("ij,ij->j", b, b)
    stop = (tol * tol) * rs
    idx = np.flatnonzero(rs > stop)              # columns still being solved
    x = np.zeros((b.shape[0], len(idx)), dtype)
    r = b[:, idx].copy()
    p = r.copy()
    rs, stop = rs[idx], stop[idx]
    for _ in range(maxiter):
        if not len(idx):
            break
        ap = p - alpha * graph.matvec(p)
        step = rs / np.einsum("ij,ij->j", p, ap)
        x += step * p
        r -= step * ap
        rs_new = np.einsum("ij,ij->j", r, r)
        p *= rs_new / rs
        p += r
        rs = rs_new
        done = rs <= stop
        if done.any():                            # converged columns leave the block
            out[:, idx[done]] = x[:, done]
            keep = ~done
            x, r, p = x[:, keep], r[:, keep], p[:, keep]
            rs, stop, idx = rs[keep], stop[keep], idx[keep]
    out[:, idx] = x
    return out[:, 0] if one else out


def query_vector_block(ids: np.ndarray, sims: np.ndarray, n: int, gamma: float,
                       k: int | None) -> np.ndarray:
    """Dense (N, Q) right-hand sides y for Q queries from their top-k neighbour lists."""
    ids, sims = ids[:, :k], sims[:, :k]
    ids, sims, valid = _check_lists(ids, sims, n, "query neighbours")
    y = np.zeros((n, len(ids)))
    q = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)[valid]
    np.add.at(y, (ids[valid], q), np.maximum(sims[valid], 0.0) ** gamma)
    return y


def diffuse(graph: Graph, query_ids: np.ndarray, query_sims: np.ndarray, topk: int = 100,
            alpha: float = 0.99, gamma: float = 3.0, query_k: int | None = 10,
            tol: float = 1e-6, maxiter: int = 20, block: int = 64, dtype=np.float32
            ) -> tuple[np.ndarray, np.ndarray]:
    """Online diffusion (Iscen et al. 2017): re-rank the gallery for each query.

    query_ids, query_sims: (Q, m) the queries' neighbour lists from the index (ids into the
    graph's N vectors, -1 = none); the first `query_k` of each (None = all) make y.
    Returns (scores (Q, topk) float32 descending, ids (Q, topk) int64), -1/-inf padded when
    fewer than topk gallery vectors are reachable. dtype: the solver's float type.
    """
    query_ids, query_sims = np.asarray(query_ids), np.asarray(query_sims)
    scores, ids = [], []
    for s in range(0, len(query_ids), block):
        y = query_vector_block(query_ids[s:s + block], query_sims[s:s + block], graph.n, gamma,
                               query_k)
        f = conjugate_gradient(graph, y, alpha, tol, maxiter, dtype)
        sc, ix = top_k_columns(f, topk)
        scores.append(sc)
        ids.append(ix)
    if not scores:
        return np.zeros((0, topk), np.float32), np.zeros((0, topk), np.int64)
    return np.concatenate(scores), np.concatenate(ids)


def diffuse_truncated(graph: Graph, query_ids: np.ndarray, query_sims: np.ndarray,
                      topk: int = 100, alpha: float = 0.99, gamma: float = 3.0,
                      query_k: int | None = 10, tol: float = 1e-6, maxiter: int = 20,
                      block: int = 32, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Truncated online diffusion (Iscen et al. 2017, Sec. "truncation"): each query diffuses
    only on the subgraph of its own neighbour list (its top-m results from the index, m =
    query_ids.shape[1], e.g. 1000), re-normalised there; y uses the first `query_k` of them.
    Cost per query ~ iterations x (m x graph k), independent of the gallery size, so this is
    the form for large galleries; with m = N it equals `diffuse`.

    Queries of a block are solved together as one block-diagonal system (one CG, one
    right-hand side): exact at convergence, with the iteration count set by the slowest.
    Returns (scores (Q, topk) float32, ids (Q, topk) int64), only ids from each query's list.
    """
    query_ids, query_sims = np.asarray(query_ids), np.asarray(query_sims)
    ids, sims, valid = _check_lists(query_ids, query_sims, graph.n, "query neighbours")
    n = graph.n
    q_total, m = ids.shape
    out_s = np.full((q_total, topk), -np.inf, np.float32)
    out_i = np.full((q_total, topk), -1, np.int64)
    affinity = graph.data * np.sqrt(graph.degree[_row_ids(graph)] * graph.degree[graph.indices])
    for s in range(0, q_total, block):
        bi, bs, bv = ids[s:s + block], sims[s:s + block], valid[s:s + block].copy()
        b = len(bi)
        # local node = position in the flattened (b, m) lists; a repeated id keeps its first
        key = np.where(bv, np.arange(b)[:, None] * n + bi, -1).ravel()
        uniq, first = np.unique(key, return_index=True)
        keep_pos = first[uniq >= 0]
        bv.ravel()[:] = False
        bv.ravel()[keep_pos] = True
        nodes = np.flatnonzero(bv.ravel())                   # local ids in use
        node_keys = key[nodes]                                # sorted: (query, id) order
        order = np.argsort(node_keys)
        node_keys, nodes = node_keys[order], nodes[order]
        g_ids = bi.ravel()[nodes]
        lens = graph.indptr[g_ids + 1] - graph.indptr[g_ids]
        offs = np.repeat(graph.indptr[g_ids] - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        src = np.repeat(nodes, lens)                          # local id of each edge's start
        dst_key = (src // m) * n + graph.indices[offs]        # (same query, neighbour id)
        pos = np.searchsorted(node_keys, dst_key)
        hit = pos < len(node_keys)
        hit[hit] = node_keys[pos[hit]] == dst_key[hit]
        src, dst, w = src[hit], nodes[pos[hit]], affinity[offs[hit]]
        order = np.lexsort((dst, src))
        sub = _normalized_graph(src[order], dst[order], w[order], b * m)
        y = np.zeros(b * m, dtype)
        head = np.zeros((b, m), bool)
        head[:, :query_k] = True
        use = head.ravel() & bv.ravel()
        y[use] = np.maximum(bs.ravel()[use], 0.0) ** gamma
        f = conjugate_gradient(sub, y, alpha, tol, maxiter, dtype).reshape(b, m)
        f = np.where(bv, f, 0.0)
        sc, loc = top_k_columns(f.T, topk)                    # (b, topk) positions in lists
        out_s[s:s + b] = sc
        out_i[s:s + b] = np.where(loc >= 0, np.take_along_axis(bi, np.maximum(loc, 0), 1), -1)
    return out_s, out_i


def _row_ids(graph: Graph) -> np.ndarray:
    return np.repeat(np.arange(graph.n), np.diff(graph.indptr))


def top_k_columns(f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of f (N, Q): the k largest positive values, descending, without a full sort.
    Returns (scores (Q, k) float32, ids (Q, k) int64); -inf / -1 where fewer than k are > 0."""
    ft = f.T
    k_eff = min(k, ft.shape[1])
    if k_eff:
        part = np.argpartition(-ft, k_eff - 1, axis=1)[:, :k_eff]
    else:
        part = np.zeros((len(ft), 0), np.int64)
    vals = np.take_along_axis(ft, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    vals = np.take_along_axis(vals, order, axis=1)
    out_s = np.full((len(ft), k), -np.inf, np.float32)
    out_i = np.full((len(ft), k), -1, np.int64)
    ok = vals > 0                                        # unreachable nodes stay out
    out_s[:, :k_eff] = np.where(ok, vals, -np.inf)
    out_i[:, :k_eff] = np.where(ok, ids, -1)
    return out_s, out_i


@dataclass(frozen=True)
class PrecomputedDiffusion:
    """Top-`keep` entries of each row of L^-1 = (I - alpha S)^-1 (Yang et al. 2019).

    ids: (N, keep) int64 (-1 padded); values: (N, keep) float32; alpha: the alpha used.
    """

    ids: np.ndarray
    values: np.ndarray
    alpha: float

    @property
    def n(self) -> int:
        return len(self.ids)

    def save(self, path: str) -> None:
        """.npz of plain arrays (no pickle), written under a temp name then renamed."""
        import io

        from contracts.storage import write_bytes_atomic

        buf = io.BytesIO()
        np.savez(buf, ids=self.ids, values=self.values, alpha=np.float64(self.alpha))
        write_bytes_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str) -> PrecomputedDiffusion:
        import io

        from contracts.storage import resolve

        fs, p = resolve(path)
        with fs.open_input_file(p) as f:
            raw = f.read()
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                ids, values, alpha = z["ids"], z["values"], float(z["alpha"])
        except (ValueError, OSError, KeyError, AttributeError) as e:
            raise DiffusionError(f"{path}: not a precomputed diffusion file ({e})") from None
        if ids.shape != values.shape or ids.ndim != 2:
            raise DiffusionError(f"{path}: inconsistent arrays in precomputed diffusion file")
        return cls(ids.astype(np.int64), values.astype(np.float32), alpha)


def precompute_diffusion(graph: Graph, alpha: float = 0.99, keep: int = 200, tol: float = 1e-6,
                         maxiter: int = 20, block: int = 256, dtype=np.float32,
                         rows: np.ndarray | None = None) -> PrecomputedDiffusion:
    """Offline stage: solve (I - alpha S) x = e_i for every node i (blocks of unit vectors)
    and keep the `keep` largest entries of each solution (= row i of L^-1).

    rows: compute only these rows (the others are left empty, ids -1), so workers can each
    take a share of the nodes and the parts be summed with `merge_precomputed`.
    """
    n = graph.n
    keep = min(int(keep), n)
    if keep < 1:
        raise DiffusionError("keep must be >= 1")
    ids = np.full((n, keep), -1, np.int64)
    values = np.zeros((n, keep), np.float32)
    todo = np.arange(n) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    if len(todo) and (todo[0] < 0 or todo[-1] >= n):
        raise DiffusionError(f"rows must be node ids in 0..{n - 1}")
    for s in range(0, len(todo), block):
        cols = todo[s:s + block]
        e = np.zeros((n, len(cols)), dtype)
        e[cols, np.arange(len(cols))] = 1.0
        sc, ix = top_k_columns(conjugate_gradient(graph, e, alpha, tol, maxiter, dtype), keep)
        ids[cols], values[cols] = ix, np.where(ix >= 0, sc, 0.0)
    return PrecomputedDiffusion(ids, values, float(alpha))


def merge_precomputed(parts: list[PrecomputedDiffusion]) -> PrecomputedDiffusion:
    """Combine precomputations of disjoint row sets (see `precompute_diffusion(rows=...)`)."""
    if not parts:
        raise DiffusionError("nothing to merge")
    ids, values = parts[0].ids.copy(), parts[0].values.copy()
    for part in parts[1:]:
        if part.ids.shape != ids.shape or part.alpha != parts[0].alpha:
            raise DiffusionError("precomputed parts differ in shape or alpha")
        filled = part.ids[:, 0] >= 0
        if (filled & (ids[:, 0] >= 0)).any():
            raise DiffusionError("precomputed parts overlap")
        ids[filled], values[filled] = part.ids[filled], part.values[filled]
    return PrecomputedDiffusion(ids, values, parts[0].alpha)


def diffuse_precomputed(pre: PrecomputedDiffusion, query_ids: np.ndarray, query_sims: np.ndarray,
                        topk: int = 100, gamma: float = 3.0, query_k: int | None = 10,
                        block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Online stage of Yang et al.: f_q = sum_j y_qj L^-1[j, :] over the stored rows, top-k.

    Arguments and returns as `diffuse` (scores (Q, topk) float32, ids (Q, topk) int64).
    """
    query_ids, query_sims = np.asarray(query_ids), np.asarray(query_sims)
    n = pre.n
    out_s = np.full((len(query_ids), topk), -np.inf, np.float32)
    out_i = np.full((len(query_ids), topk), -1, np.int64)
    for s in range(0, len(query_ids), block):
        qi, qs, valid = _check_lists(query_ids[s:s + block, :query_k],
                                     query_sims[s:s + block, :query_k], n, "query neighbours")
        y = np.where(valid, np.maximum(qs, 0.0) ** gamma, 0.0)               # (b, kq)
        rows = pre.ids[np.where(valid, qi, 0)]                               # (b, kq, keep)
        vals = pre.values[np.where(valid, qi, 0)] * y[:, :, None]
        b = len(qi)
        q = np.broadcast_to(np.arange(b)[:, None, None], rows.shape)
        ok = (rows >= 0) & valid[:, :, None] & (vals > 0)
        key = q[ok] * n + rows[ok]
        uniq, inv = np.unique(key, return_inverse=True)
        score = np.bincount(inv, weights=vals[ok].astype(np.float64))
        qq, ids = uniq // n, uniq % n
        order = np.lexsort((-score, qq))                  # by query, then score descending
        qq, ids, score = qq[order], ids[order], score[order]
        rank = np.arange(len(qq)) - np.searchsorted(qq, qq)   # position within its query
        top = rank < topk
        out_s[s + qq[top], rank[top]] = score[top]
        out_i[s + qq[top], rank[top]] = ids[top]
    return out_s, out_i


# ---- diffusion as a re-ranking step over a gallery search (query.py / evaluate.py) ----------

def knn_graph(gallery: np.ndarray, search: SearchFn, k: int = 20, gamma: float = 3.0,
              batch: int = 65536) -> Graph:
    """Mutual kNN affinity graph of the gallery (G, D) float32 from `search(x, k) -> (scores,
    ids)` over those same G vectors (exact flat search, or the sharded index): each vector's
    k nearest others, so the index is asked for k + 1 (the vector itself is dropped)."""
    if k < 1:
        raise DiffusionError(f"graph k must be >= 1, got {k}")
    sims, ids = [], []
    for s in range(0, len(gallery), batch):
        sc, ix = search(np.ascontiguousarray(gallery[s:s + batch], np.float32), k + 1)
        sims.append(np.asarray(sc))
        ids.append(np.asarray(ix, np.int64))
    return build_graph(np.concatenate(ids), np.concatenate(sims), gamma=gamma)


def fill_with_original(scores: np.ndarray, ids: np.ndarray, orig_ids: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Complete diffusion top-k lists (-1 where fewer nodes were reached) with the query's own
    search results not already listed, in their original order, scored 0 (not reached).
    scores, ids: (Q, k); orig_ids: (Q, m) int64. Returns new (scores, ids)."""
    scores, ids = scores.copy(), ids.copy()
    for r in np.flatnonzero((ids < 0).any(axis=1)):
        have = ids[r][ids[r] >= 0]
        extra = orig_ids[r][(orig_ids[r] >= 0) & ~np.isin(orig_ids[r], have)]
        n = min(len(extra), int((ids[r] < 0).sum()))
        start = len(have)
        ids[r, start:start + n] = extra[:n]
        scores[r, start:start + n] = 0.0
    return scores, ids


def diffusion_rerank(query: np.ndarray, gallery: np.ndarray, search: SearchFn, topk: int = 100,
                     k: int = 20, alpha: float = 0.99, gamma: float = 3.0, query_k: int = 10,
                     truncate: int = 1000, full_max: int = 20_000, graph: Graph | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank query (Q, D) against gallery (G, D) (float32, L2-normalised) by diffusion on
    the gallery's kNN graph, every neighbour list taken from `search` over the gallery.

    Galleries up to `full_max` vectors: online diffusion on the whole graph (`diffuse`);
    larger ones: truncated diffusion on each query's top-`truncate` list (`diffuse_truncated`),
    whose cost does not grow with G. Lists are completed with not-reached entries (score 0) in
    cosine order. Returns (scores (Q, min(topk, G)) float32 descending, ids (Q, min(topk, G))
    int64 gallery rows; -1 / -inf only where the search listed fewer)."""
    g_n = len(gallery)
    topk = min(topk, g_n)  # no more answers than gallery vectors (a huge k only pads)
    if graph is None:
        graph = knn_graph(gallery, search, k, gamma)
    truncated = g_n > full_max
    m = min(g_n, max(truncate, topk) if truncated else max(query_k, topk))
    sims, ids = search(np.ascontiguousarray(query, np.float32), m)
    ids = np.asarray(ids, np.int64)
    if truncated:
        sc, ix = diffuse_truncated(graph, ids, sims, topk, alpha, gamma, query_k)
    else:
        sc, ix = diffuse(graph, ids, sims, topk, alpha, gamma, query_k)
    return fill_with_original(sc, ix, ids)
