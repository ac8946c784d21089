"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in an exact dense form and a scalable form.

Definitions (DESIGN.md, "Re-ranking"): the "original distance" is the squared Euclidean distance
between L2-normalised embeddings, 2 - 2 cos, over the union of queries and gallery (queries
first, then gallery, as in the paper's code); each point's row of distances is divided by its
largest distance (the reference divides every column of the union matrix by its maximum and
transposes). Then, with initial_rank[i] the points ordered by distance from i (i itself first):

- R(i, k): the forward neighbours initial_rank[i, :k+1] that have i among their own k+1.
- R*(i): R(i, k1) plus, for every c in R(i, k1), R(c, round(k1/2)) when more than 2/3 of that
  set lies in R(i, k1).
- V[i, j] = exp(-d(i, j)) / sum_{j' in R*(i)} exp(-d(i, j')) for j in R*(i), 0 elsewhere.
- Local query expansion: V[i] <- mean of V over initial_rank[i, :k2] (skipped when k2 == 1).
- Jaccard distance: 1 - t / (2 - t) with t = sum_k min(V[q, k], V[g, k]); the rows of V sum
  to 1, so sum_k max = 2 - t.
- final = (1 - lambda) * jaccard + lambda * d(q, g).

Both forms run one engine on neighbour lists and keep V as sparse rows (CSR), so the only
dense object of the exact form is the (Q+G)^2 distance matrix that the reference takes as input.
The scalable form gets its neighbour lists from a FAISS index (or any search function) and
distances from the vectors themselves, so its memory is O((Q+G) * k). A gallery item g that
shares no support with the query has t = 0, so its final distance is (1 - lambda) + lambda *
d(q, g): ordered exactly like the original distance. The scalable form therefore scores the
query's overlap set together with its `candidates` nearest neighbours, which makes its top-k
the exact top-k whenever the k-th distance is below (1 - lambda) + lambda * (distance of the
last candidate); `RerankResult.certified` says for which queries that was checked to hold.

Use with query expansion / database augmentation (index.rerank.expansion): expand or augment the
vectors first, then re-rank the new vectors, or call index.rerank.chain.rerank with a `RerankConfig`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from index.rerank.graph import GalleryGraph, union_neighbours
from index.rerank.neighbours import (
    SearchFn,
    filtered_search_fn,
    flat_search_fn,
    self_first,
    union_search_fn,
)

__all__ = ["AUTO_SEARCH_MAX", "RerankResult", "SparseRows", "expansion_weights", "farthest_in_sample",
           "jaccard_from_overlap", "jaccard_overlaps", "k_reciprocal_exact", "k_reciprocal_from_embeddings",
           "k_reciprocal_sparse", "local_query_expansion", "original_distance", "query_candidate_count",
           "reciprocal_neighbours",
           "resolve_max_distance"]

# --------------------------------------------------------------------------------------------
# small sparse-row container and vectorised gathers
# --------------------------------------------------------------------------------------------
@dataclass
class SparseRows:
    """Rows of a sparse (N, N) float32 matrix in CSR form: row r holds columns
    indices[indptr[r]:indptr[r+1]] (int32, ascending) with values data[...] (float32)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1


def _gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n): (sum(lengths),) int64."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts.astype(np.int64), lengths)


def _csr_from_parts(counts: list[np.ndarray], cols: list[np.ndarray], vals: list[np.ndarray]) -> SparseRows:
    counts_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    indptr = np.zeros(len(counts_all) + 1, np.int64)
    np.cumsum(counts_all, out=indptr[1:])
    return SparseRows(indptr,
                      np.concatenate(cols).astype(np.int32) if cols else np.zeros(0, np.int32),
                      np.concatenate(vals).astype(np.float32) if vals else np.zeros(0, np.float32))


def _row_chunks(n: int, size: int):
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# the engine: neighbour lists -> V (CSR) -> Jaccard overlaps
# --------------------------------------------------------------------------------------------
PairDist = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""pair_dist(a, b) -> (n,) float32 normalised original distances d(a[i], b[i])."""


def reciprocal_neighbours(nn: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """R(i, k) for the points `rows`: (C, k+1) int64, the forward neighbours nn[i, :k+1] that
    are k-reciprocal (i is among their own first k+1), -1 where not. nn: (N, K) int64, -1 for
    missing entries."""
    fwd = nn[rows, :k + 1]
    valid = fwd >= 0
    back = nn[np.where(valid, fwd, 0), :k + 1]  # (C, k+1, k+1)
    recip = (back == rows[:, None, None]).any(axis=2) & valid
    return np.where(recip, fwd, -1)


def expansion_weights(nn: np.ndarray, pair_dist: PairDist, k1: int, chunk: int = 4096) -> SparseRows:
    """V before local query expansion: for each point i, weights exp(-d) normalised to sum 1
    over its expanded k-reciprocal set R*(i). nn: (N, K>=k1+1) int64 neighbour lists."""
    n = len(nn)
    k_half = int(np.around(k1 / 2.0))  # round half to even, as the reference's np.around
    half = np.concatenate([reciprocal_neighbours(nn, r, k_half) for r in _row_chunks(n, chunk)]) \
        if n else np.zeros((0, k_half + 1), np.int64)
    counts, cols, vals = [], [], []
    for rows in _row_chunks(n, chunk):
        r_set = reciprocal_neighbours(nn, rows, k1)  # (C, k1+1)
        r_valid = r_set >= 0
        cand = half[np.where(r_valid, r_set, 0)]  # (C, k1+1, k_half+1)
        cand_valid = (cand >= 0) & r_valid[:, :, None]
        size = cand_valid.sum(axis=2)
        in_r = (cand[..., None] == r_set[:, None, None, :]).any(axis=3) & cand_valid
        accept = r_valid & (in_r.sum(axis=2) > 2.0 / 3.0 * size)
        extra = np.where(accept[:, :, None] & cand_valid, cand, -1).reshape(len(rows), -1)
        members = np.sort(np.concatenate([r_set, extra], axis=1), axis=1)
        keep = members >= 0
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]  # unique per row (rows are sorted)
        local, _ = np.nonzero(keep)
        col = members[keep]
        d = pair_dist(rows[local], col)
        w = np.exp(-d.astype(np.float32))
        row_sum = np.bincount(local, weights=w, minlength=len(rows)).astype(np.float32)
        counts.append(keep.sum(axis=1))
        cols.append(col)
        vals.append(w / row_sum[local])
    return _csr_from_parts(counts, cols, vals)


def local_query_expansion(v: SparseRows, nn: np.ndarray, k2: int, chunk: int = 4096) -> SparseRows:
    """V[i] <- mean of V over nn[i, :k2] (missing neighbours, -1, are left out of the mean).
    Returns V itself when k2 == 1, as the reference does."""
    if k2 <= 1:
        return v
    n = v.num_rows
    counts, cols, vals = [], [], []
    for rows in _row_chunks(n, chunk):
        src = nn[rows, :k2]
        owner = np.repeat(np.arange(len(rows)), src.shape[1]).reshape(src.shape)
        ok = src >= 0
        src, owner = src[ok], owner[ok]
        n_src = np.bincount(owner, minlength=len(rows))
        starts = v.indptr[src]
        lengths = v.indptr[src + 1] - starts
        idx = _gather_ranges(starts, lengths)
        own = np.repeat(owner, lengths)
        key = own * n + v.indices[idx]
        uniq, inv = np.unique(key, return_inverse=True)
        summed = np.bincount(inv.reshape(-1), weights=v.data[idx], minlength=len(uniq))
        u_own = uniq // n
        counts.append(np.bincount(u_own, minlength=len(rows)))
        cols.append(uniq % n)
        vals.append((summed / n_src[u_own]).astype(np.float32))
    return _csr_from_parts(counts, cols, vals)


@dataclass
class _Columns:
    """Column view (CSC) of the rows >= first_row of a SparseRows: for column c, the rows
    rows[colptr[c]:colptr[c+1]] with values vals[...]."""

    colptr: np.ndarray
    rows: np.ndarray
    vals: np.ndarray


def _columns(v: SparseRows, first_row: int, n_cols: int) -> _Columns:
    lo = v.indptr[first_row]
    row_of = np.repeat(np.arange(first_row, v.num_rows, dtype=np.int32), np.diff(v.indptr[first_row:]))
    cols = v.indices[lo:]
    order = np.argsort(cols, kind="stable")
    colptr = np.zeros(n_cols + 1, np.int64)
    np.cumsum(np.bincount(cols, minlength=n_cols), out=colptr[1:])
    return _Columns(colptr, row_of[order], v.data[lo:][order])


def jaccard_overlaps(v: SparseRows, queries: np.ndarray, cols: _Columns, budget: int = 1 << 21):
    """For each query row q (in `queries`), the rows g with t(q, g) = sum_k min(V[q,k], V[g,k]) > 0
    among the rows that `cols` covers. Yields, per chunk of consecutive queries,
    (start, stop, pos, g, t): the chunk is queries[start:stop]; pos (n,) int64 positions into
    `queries`, g (n,) int64 rows, t (n,) float32, sorted by pos then g. `budget` bounds the
    number of (q, k, g) triples held at once (a single query may exceed it)."""
    q_start = v.indptr[queries]
    q_len = v.indptr[queries + 1] - q_start
    col_len = np.diff(cols.colptr)
    # triples per query, to cut the queries into chunks of bounded work
    owner = np.repeat(np.arange(len(queries)), q_len)
    work = np.bincount(owner, weights=col_len[v.indices[_gather_ranges(q_start, q_len)]],
                       minlength=len(queries))
    cum = np.cumsum(work)
    bound = int(cols.rows.max()) + 1 if len(cols.rows) else 1  # pair key = pos * bound + g
    start = 0
    while start < len(queries):
        done = cum[start - 1] if start else 0.0
        stop = max(start + 1, int(np.searchsorted(cum, done + budget, side="right")))
        pos = np.arange(start, stop)
        idx = _gather_ranges(q_start[pos], q_len[pos])
        own_k = np.repeat(pos, q_len[pos])
        k = v.indices[idx]
        c_start = cols.colptr[k]
        c_len = cols.colptr[k + 1] - c_start
        cidx = _gather_ranges(c_start, c_len)
        own = np.repeat(own_k, c_len)
        g = cols.rows[cidx].astype(np.int64)
        m = np.minimum(np.repeat(v.data[idx], c_len), cols.vals[cidx])
        uniq, inv = np.unique(own * bound + g, return_inverse=True)
        t = np.bincount(inv.reshape(-1), weights=m, minlength=len(uniq)).astype(np.float32)
        yield start, stop, uniq // bound, uniq % bound, t
        start = stop


def jaccard_from_overlap(t: np.ndarray) -> np.ndarray:
    """Jaccard distance 1 - t / (2 - t) in float32, as the reference computes it."""
    t = t.astype(np.float32)
    return np.float32(1.0) - t / (np.float32(2.0) - t)


# --------------------------------------------------------------------------------------------
# exact (dense) form
# --------------------------------------------------------------------------------------------
def original_distance(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray) -> np.ndarray:
    """The reference's normalised original distance, already transposed: (N, N) float32 with
    N = Q + G, row i = squared distances of every point to i divided by their maximum.
    Inputs are (non-squared) distances, as the reference takes them."""
    q, g = q_g_dist.shape
    n = q + g
    # Build the transpose of [[qq, qg], [qg.T, gg]] directly: [[qq.T, qg], [qg.T, gg.T]].
    out = np.empty((n, n), np.float32)
    for block, rs, cs in ((np.asarray(q_q_dist).T, slice(0, q), slice(0, q)),
                          (np.asarray(q_g_dist), slice(0, q), slice(q, n)),
                          (np.asarray(q_g_dist).T, slice(q, n), slice(0, q)),
                          (np.asarray(g_g_dist).T, slice(q, n), slice(q, n))):
        # square in the input dtype, then float32, as the reference does
        out[rs, cs] = np.power(block, 2).astype(np.float32)
    out /= out.max(axis=1, keepdims=True)
    return out


def _dense_neighbours(dist: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """First k entries of each row's argsort (ascending): (N, k) int64, without a full sort."""
    n = dist.shape[1]
    k = min(k, n)
    out = np.empty((len(dist), k), np.int64)
    for rows in _row_chunks(len(dist), chunk):
        block = dist[rows]
        part = np.argpartition(block, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(rows), 1))
        order = np.argsort(np.take_along_axis(block, part, axis=1), axis=1, kind="stable")
        out[rows] = np.take_along_axis(part, order, axis=1)
    return out


def k_reciprocal_exact(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray,
                       k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking with the reference's signature and result.

    q_g_dist: (Q, G), q_q_dist: (Q, Q), g_g_dist: (G, G) distances (not squared: like the
    reference, this squares them); any float dtype. Returns (Q, G) float32 final distances,
    equal to person-re-ranking / torchreid ``re_ranking`` fed the same matrices (ties in the
    initial ranking aside). Dense: holds one (Q+G)^2 float32 matrix; meant for Q+G up to ~20,000.
    """
    _check_params(k1, k2, lambda_value)
    q, g = np.shape(q_g_dist)
    if np.shape(q_q_dist) != (q, q) or np.shape(g_g_dist) != (g, g):
        raise ValueError(f"distance matrices disagree: q_g {np.shape(q_g_dist)}, "
                         f"q_q {np.shape(q_q_dist)}, g_g {np.shape(g_g_dist)}")
    dist = original_distance(q_g_dist, q_q_dist, g_g_dist)
    return _exact_from_original(dist, q, k1, k2, lambda_value)


def _exact_from_original(dist: np.ndarray, q: int, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    n = len(dist)
    nn = _dense_neighbours(dist, max(k1 + 1, k2))
    v = expansion_weights(nn, lambda a, b: dist[a, b], k1)
    v = local_query_expansion(v, nn, k2)
    jaccard = np.ones((q, n - q), np.float32)
    cols = _columns(v, q, n)
    for _, _, pos, g, t in jaccard_overlaps(v, np.arange(q), cols):
        jaccard[pos, g - q] = jaccard_from_overlap(t)
    return jaccard * np.float32(1 - lambda_value) + dist[:q, q:] * np.float32(lambda_value)


def k_reciprocal_from_embeddings(query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6,
                                 lambda_value: float = 0.3, gallery_keep: np.ndarray | None = None
                                 ) -> np.ndarray:
    """Exact re-ranking of L2-normalised vectors. query: (Q, D), gallery: (G, D) float32.

    Equals ``k_reciprocal_exact(sqrt(2 - 2 q.g), sqrt(2 - 2 q.q), sqrt(2 - 2 g.g))`` (original
    distance 2 - 2 cos) up to float32 rounding, holding one (Q+G)^2 float32 matrix.
    gallery_keep: optional (G,) bool, False for items that take no part (junk, item "-1"):
    they are left out of the union and get +inf in the result.
    Returns (Q, G) float32 final distances (smaller is nearer).
    """
    _check_params(k1, k2, lambda_value)
    query = np.ascontiguousarray(query, np.float32)
    gallery = np.ascontiguousarray(gallery, np.float32)
    _check_pair(query, gallery)
    keep = _keep_rows(gallery_keep, len(gallery))
    kept = gallery[keep] if keep is not None else gallery

    # The union matrix 2 - 2 x.x^T, built in place (one (Q+G)^2 float32 array). It is symmetric,
    # so the reference's column maxima are its row maxima and its transpose is itself.
    x = np.concatenate([query, kept])
    dist = np.matmul(x, x.T)
    dist *= -2.0
    dist += 2.0
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)  # a point's distance to itself is 0, whatever |x|^2 rounds to
    dist /= np.maximum(dist.max(axis=1, keepdims=True), np.float32(1e-30))
    final = _exact_from_original(dist, len(query), k1, k2, lambda_value)
    del dist
    if keep is None:
        return final
    out = np.full((len(query), len(gallery)), np.inf, np.float32)
    out[:, keep] = final
    return out


# --------------------------------------------------------------------------------------------
# scalable (sparse) form
# --------------------------------------------------------------------------------------------
@dataclass
class RerankResult:
    """Re-ranked top-k lists. ids: (Q, k) int64 gallery row numbers (of the gallery as given,
    junk included in the numbering), -1 past the end of a short list; distances: (Q, k) float32
    final distances, ascending, +inf past the end; certified: (Q,) bool, True where the list is
    provably the exact top-k of the neighbour lists used (see module docstring)."""

    ids: np.ndarray
    distances: np.ndarray
    certified: np.ndarray

    @property
    def scores(self) -> np.ndarray:
        """(Q, k) float32 scores, higher is better: the negated distances."""
        return -self.distances

    def dense_scores(self, num_gallery: int, rows: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), num_gallery) float32 scores for metric code that wants whole rows: the
        listed items get -distance, every other item -inf. Small galleries / row chunks only."""
        rows = np.arange(len(self.ids)) if rows is None else np.asarray(rows)
        out = np.full((len(rows), num_gallery), -np.inf, np.float32)
        ids = self.ids[rows]
        r, c = np.nonzero(ids >= 0)
        out[r, ids[r, c]] = -self.distances[rows][r, c]
        return out


AUTO_SEARCH_MAX = 20_000


def resolve_max_distance(max_distance: str | float, n: int) -> str | float:
    """"auto" -> "search" for up to AUTO_SEARCH_MAX points, "sample" above: a farthest-point
    search of -x costs a pass over the whole index per point (brute force in a Flat index, a
    long walk in HNSW), which does not scale; the sample's estimate differs only slightly."""
    if max_distance == "auto":
        return "search" if n <= AUTO_SEARCH_MAX else "sample"
    return max_distance


def farthest_in_sample(x: np.ndarray, sample_size: int = 8192, seed: int = 0,
                       budget: int = 64 << 20, rows: np.ndarray | None = None,
                       sample: np.ndarray | None = None) -> np.ndarray:
    """(n,) float32 largest squared distance 2 - 2 cos from each row of x (n, D) float32 to a
    random sample of rows of x: an estimate of the reference's row normaliser. The products are
    taken in row chunks of about `budget` bytes. rows: only these rows of x ((r,) int64; the
    result is (r,)); sample: these (S, D) vectors instead of a sample of x."""
    if sample is None:
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(len(x), min(sample_size, len(x)), replace=False))]
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, np.int64)
    out = np.empty(len(rows), np.float32)
    # rows per product: bounded by the (chunk, S) product and by the gathered (chunk, D) rows
    chunk = max(64, min(budget // (4 * len(sample)), budget // (4 * max(1, x.shape[1]))))
    for s in range(0, len(rows), chunk):
        out[s:s + chunk] = 2.0 - 2.0 * (x[rows[s:s + chunk]] @ sample.T).min(axis=1)
    return out


class _Union:
    """Rows of [query; gallery] by index, without holding the (Q + G, D) concatenation (at
    300,000 x 1280 a copy of 1.5 GB)."""

    def __init__(self, query: np.ndarray, gallery: np.ndarray):
        self.query, self.gallery = query, gallery
        self.shape = (len(query) + len(gallery), query.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx, np.int64)
        n_q = len(self.query)
        if len(idx) and idx.min() >= n_q:
            return self.gallery[idx - n_q]
        if len(idx) and idx.max() < n_q:
            return self.query[idx]
        out = np.empty((len(idx), self.shape[1]), np.float32)
        in_q = idx < n_q
        out[in_q] = self.query[idx[in_q]]
        out[~in_q] = self.gallery[idx[~in_q] - n_q]
        return out


def _pair_dots(x: np.ndarray, a: np.ndarray, b: np.ndarray, budget: int = 32 << 20) -> np.ndarray:
    """(n,) float32 dots x[a[i]] . x[b[i]]; the two gathered blocks hold at most ~`budget` bytes
    (a fixed row count held 1.3 GB at D=1280)."""
    out = np.empty(len(a), np.float32)
    block = max(256, budget // (2 * 4 * max(1, x.shape[1])))
    for s in range(0, len(a), block):
        e = min(s + block, len(a))
        out[s:e] = np.einsum("ij,ij->i", x[a[s:e]], x[b[s:e]])
    return out


def _keep_rows(gallery_keep, g: int) -> np.ndarray | None:
    if gallery_keep is None:
        return None
    keep = np.asarray(gallery_keep, bool)
    if keep.shape != (g,):
        raise ValueError(f"gallery_keep has shape {keep.shape}, expected ({g},)")
    return None if keep.all() else keep


def _check_pair(query: np.ndarray, gallery: np.ndarray) -> None:
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {query.shape} and gallery {gallery.shape} must be (n, D) with the same D")
    if len(gallery) == 0:
        raise ValueError("gallery is empty")
    # in blocks: a whole (G, D) bool mask is 384 MB at 300,000 x 1280
    if not all(np.isfinite(x[s:s + 65536]).all() for x in (query, gallery) for s in range(0, len(x), 65536)):
        raise ValueError("query or gallery vectors contain NaN or inf")


def _check_params(k1, k2, lambda_value):
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")


def query_candidate_count(k1: int, k2: int, topk: int, candidates: int | None, n_query: int,
                          n_gallery: int, graph: bool = False) -> int:
    """How many gallery neighbours k_reciprocal_sparse searches per query (its
    `query_candidates` must hold at least this many columns): max(k1 + 1, 2 * topk) or
    `candidates` (at least k1 + 1), at most the gallery; with a neighbour graph also every
    union neighbour the query needs (max(k1 + 1, k2))."""
    cand = max(k1 + 1, 2 * topk) if candidates is None else max(int(candidates), k1 + 1)
    n_cand = min(cand, n_gallery)
    return max(n_cand, min(max(k1 + 1, k2), n_query + n_gallery)) if graph else n_cand


def k_reciprocal_sparse(query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3, *, topk: int = 100, candidates: int | None = None,
                        search_fn: SearchFn | None = None, gallery_keep: np.ndarray | None = None,
                        max_distance: str | float = "auto", chunk: int = 4096,
                        stats: dict | None = None, gallery_search_fn: SearchFn | None = None,
                        neighbour_graph: GalleryGraph | None = None,
                        query_candidates: tuple[np.ndarray, np.ndarray] | None = None) -> RerankResult:
    """Scalable k-reciprocal re-ranking from neighbour lists; returns top-k lists per query
    ((Q, min(topk, kept G)) arrays, every entry filled when the searches list that many).

    query: (Q, D), gallery: (G, D) float32 L2-normalised. search_fn: inner-product search over
    the union U = [query; kept gallery] (row numbers: queries 0..Q-1, then kept gallery rows in
    order); None builds it from `gallery_search_fn` (see union_search_fn).
    gallery_search_fn: inner-product search over the kept gallery rows alone (row numbers 0..,
    in kept order); None: an exact flat search (flat_search_fn) when search_fn is None too, else the
    gallery entries filtered out of search_fn's lists (more searches when queries crowd them
    out: pass the gallery search when there is one).
    candidates: gallery neighbours per query scored besides its Jaccard overlap set (default
    max(k1 + 1, 2 * topk)); they come from the gallery search, not the union's, so that every
    query ranks min(topk, G) gallery rows even when its union neighbours are all other queries
    (many more queries than gallery vectors). gallery_keep: (G,) bool, False for junk.
    max_distance: "auto" (default) is "search" up to AUTO_SEARCH_MAX points of U and "sample"
    above; "search" finds each point's largest distance (the reference's row
    normaliser) with one k=1 search of -x; "sample" takes the largest distance to a random
    sample of 8,192 points of U (a slight underestimate, one BLAS product instead of a second
    pass over the index); a float uses that constant for every point (4.0 bounds the squared
    distance of unit vectors).
    Distances are recomputed from the vectors, so an approximate index only changes which
    neighbours are found. Memory O((Q + G) * (k1 + candidates)) plus the sparse rows of V.
    With an exact search the result equals the top-k of `k_reciprocal_from_embeddings`.
    stats: if a dict is given, it receives seconds per stage and the sizes of V.
    neighbour_graph: the kept gallery rows' own GalleryGraph (index.rerank.graph, built once
    per index version): the gallery rows' union lists are merged from it and the queries'
    candidate lists instead of searched (the same lists with an exact index), and their row
    normalisers come from it when its far_mode is the one max_distance resolves to.
    query_candidates: (scores (Q, C) float32, ids (Q, C) int64 kept gallery rows, -1 padding),
    each query's gallery search done ahead with C >= query_candidate_count(...) columns;
    gallery_search_fn is then not called for the queries (with the graph: not at all, unless
    rows' graph lists are short).
    """
    import time

    stats = {} if stats is None else stats
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        stats[f"seconds_{name}"] = round(now - clock[0], 3)
        clock[0] = now

    _check_params(k1, k2, lambda_value)
    query = np.ascontiguousarray(query, np.float32)
    gallery = np.ascontiguousarray(gallery, np.float32)
    _check_pair(query, gallery)
    keep = _keep_rows(gallery_keep, len(gallery))
    gallery_rows = np.flatnonzero(keep) if keep is not None else np.arange(len(gallery))
    x = _Union(query, gallery[gallery_rows] if keep is not None else gallery)  # no (Q + G, D) copy
    n_q, n = len(query), len(x)
    if neighbour_graph is not None and len(neighbour_graph) != n - n_q:
        raise ValueError(f"neighbour_graph has {len(neighbour_graph)} rows, the kept gallery {n - n_q}")
    n_g = n - n_q
    if search_fn is None:
        gallery_search_fn = gallery_search_fn or flat_search_fn(x.gallery)
        search_fn = union_search_fn(query, gallery_search_fn)
    elif gallery_search_fn is None:
        union_search = search_fn

        def gallery_search_fn(v, k):  # union ids >= Q are the gallery's, renumbered from 0
            return filtered_search_fn(union_search, np.arange(n) >= n_q)(v, k)

    # neighbour lists over the union: every point needs its first max(k1+1, k2)
    k_all = min(max(k1 + 1, k2), n)
    use_graph = neighbour_graph is not None
    n_cand = query_candidate_count(k1, k2, topk, candidates, n_q, n_g, graph=False)
    # each query's candidates: its nearest GALLERY rows (union row numbers), -1 padded
    q_ids = np.full((n_q, n_cand), -1, np.int64)
    n_search = query_candidate_count(k1, k2, topk, candidates, n_q, n_g, graph=use_graph)
    c_ids = np.full((n_q, n_search), -1, np.int64)
    c_sims = np.full((n_q, n_search), -np.inf, np.float32)
    if query_candidates is not None:  # searched before the call (the index may be closed since)
        sc, ids = np.asarray(query_candidates[0], np.float32), np.asarray(query_candidates[1], np.int64)
        if ids.ndim != 2 or sc.shape != ids.shape or len(ids) != n_q or ids.shape[1] < min(n_search, n_g):
            raise ValueError(f"query_candidates has shape {ids.shape}, expected ({n_q}, >= {min(n_search, n_g)}): "
                             f"use query_candidate_count")
        c_ids[:, :min(n_search, ids.shape[1])] = np.asarray(ids, np.int64)[:, :n_search]
        c_sims[:, :min(n_search, ids.shape[1])] = np.asarray(sc, np.float32)[:, :n_search]
    for rows in _row_chunks(n_q, 65536) if query_candidates is None else ():
        sc, ids = gallery_search_fn(query[rows], n_search)
        ids = np.asarray(ids, np.int64)[:, :n_search]
        c_ids[rows, :ids.shape[1]] = ids
        c_sims[rows, :ids.shape[1]] = np.asarray(sc, np.float32)[:, :n_search]
    q_ids[:] = np.where(c_ids[:, :n_cand] >= 0, c_ids[:, :n_cand] + n_q, -1)
    if use_graph:
        nn = union_neighbours(neighbour_graph, query, x.gallery, c_sims, c_ids, k_all,
                              gallery_search_fn, stats)
    else:
        nn = np.empty((n, k_all), np.int64)
        for rows in _row_chunks(n, 65536):
            _, ids = search_fn(x[rows], k_all)
            nn[rows] = self_first(np.asarray(ids, np.int64), rows)
    del c_ids, c_sims
    lap("search")

    max_distance = resolve_max_distance(max_distance, n)
    stats["max_distance"] = max_distance
    graph_far = use_graph and neighbour_graph.far_mode == max_distance
    todo = n_q if graph_far else n  # with the graph's normalisers only the queries' are found here
    if max_distance == "search":
        far = np.empty(n, np.float32)
        for rows in _row_chunks(todo, max(1024, (64 << 20) // (4 * x.shape[1]))):  # -x is a copy
            s, _ = search_fn(-x[rows], 1)
            far[rows] = 2.0 + 2.0 * s[:, 0]  # 2 - 2 * (min cos)
        if graph_far:  # the gallery's farthest: the graph's (gallery) or a query's, exactly
            s, _ = flat_search_fn(query)(-x.gallery, 1)
            far[n_q:] = np.maximum(neighbour_graph.far, 2.0 + 2.0 * s[:, 0])
    elif max_distance == "sample":
        if graph_far:  # the graph sampled the gallery; add the queries' share of a union sample
            far = np.empty(n, np.float32)
            far[:n_q] = farthest_in_sample(x, sample_size=8192, rows=np.arange(n_q))
            share = min(n_q, max(1, round(min(8192, n) * n_q / n)))
            q_sample = query[np.sort(np.random.default_rng(0).choice(n_q, share, replace=False))]
            far[n_q:] = np.maximum(neighbour_graph.far, farthest_in_sample(
                x, rows=np.arange(n_q, n), sample=q_sample))
        else:
            far = farthest_in_sample(x, sample_size=8192)
    else:
        far = np.full(n, float(max_distance), np.float32)
    far = np.maximum(far, np.float32(1e-12))
    lap("farthest")

    def pair_dist(a, b):
        d = np.maximum(np.float32(2.0) - np.float32(2.0) * _pair_dots(x, a, b), np.float32(0.0))
        d[a == b] = 0.0
        return d / far[a]

    v = expansion_weights(nn, pair_dist, k1, chunk)
    stats["v_entries_per_row"] = round(len(v.data) / n, 2)
    v = local_query_expansion(v, nn, k2, chunk)
    stats["v_qe_entries_per_row"] = round(len(v.data) / n, 2)
    del nn
    cols = _columns(v, n_q, n)
    lap("encoding")

    # bound on the final distance of a gallery row outside a query's candidates and overlap
    # set (Jaccard distance 1): at least (1 - lambda) + lambda * d(q, last candidate);
    # recomputed from the vectors, since the search's scores may be approximate
    listed = (q_ids >= 0).sum(axis=1)
    complete = listed >= n_g  # the list holds every gallery row
    last = q_ids[np.arange(n_q), np.maximum(listed - 1, 0)]
    bound = np.float32(1 - lambda_value) + np.float32(lambda_value) * pair_dist(np.arange(n_q), np.maximum(last, 0))
    bound[listed < n_cand] = -np.inf  # a short list (approximate index) proves nothing

    k_out = min(topk, n_g)  # G gallery rows have no more than G answers
    ids_out = np.full((n_q, k_out), -1, np.int64)
    dist_out = np.full((n_q, k_out), np.inf, np.float32)
    lam = np.float32(lambda_value)
    for lo, hi, pos, g, t in jaccard_overlaps(v, np.arange(n_q), cols):
        qs = np.arange(lo, hi)
        cand = q_ids[qs]
        c_own = np.repeat(qs, cand.shape[1])
        c_g = cand.reshape(-1)
        ok = c_g >= 0
        # overlap pairs first, so that np.unique keeps their t
        own = np.concatenate([pos, c_own[ok]])
        gg = np.concatenate([g, c_g[ok]])
        tt = np.concatenate([t, np.zeros(int(ok.sum()), np.float32)])
        _, first = np.unique(own * n + gg, return_index=True)
        own, gg, tt = own[first], gg[first], tt[first]
        final = jaccard_from_overlap(tt) * np.float32(1 - lambda_value) + pair_dist(own, gg) * lam
        order = np.lexsort((gg, final, own))
        own, gg, final = own[order], gg[order], final[order]
        starts = np.searchsorted(own, qs)
        rank = np.arange(len(own)) - np.repeat(starts, np.diff(np.append(starts, len(own))))
        sel = rank < k_out
        ids_out[own[sel], rank[sel]] = gallery_rows[gg[sel] - n_q]
        dist_out[own[sel], rank[sel]] = final[sel]
    kth = dist_out[:, -1]
    certified = complete | (kth <= bound)
    lap("jaccard_topk")
    return RerankResult(ids_out, dist_out, certified)
