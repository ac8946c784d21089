"""Retrieval metrics with the DESIGN.md evaluation protocol: mAP, mINP and CMC@k.

Per-query arrays first (as fast-reid does), aggregates second. Nothing here holds a whole
query x gallery matrix: queries are scored in chunks and each query is ranked without a full
argsort (only its positives are sorted; negatives are counted above each positive with
``searchsorted``), so the cost per query is O(G log P) for P true matches.

Rules (DESIGN.md, "Evaluation protocol"):
- ReID rule, when camera ids are known: a gallery entry with the query's item AND the query's
  camera is removed from that query's ranking; item "-1" (junk) is removed; item "0"
  (distractor) stays as a negative.
- Fashion rule, no camera ids: nothing is removed.
- A query with no remaining true match is not valid: it is counted out of num_valid_queries.
- Ties in score are broken by gallery order, as a stable sort would, so the results equal
  torchreid/fast-reid ``eval_market1501`` fed ``-scores`` with a stable argsort.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

JUNK_ITEM = "-1"
DISTRACTOR_ITEM = "0"
CMC_RANKS = (1, 5, 10, 20, 50)
NO_MATCH = -1


@dataclass
class PerQueryMetrics:
    """Per-query results. ap, inp: (Q,) float64 (NaN when invalid); first_match: (Q,) int64
    0-based rank of the first true match (NO_MATCH when invalid); num_matches: (Q,) int64."""

    ap: np.ndarray
    inp: np.ndarray
    first_match: np.ndarray
    num_matches: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return self.num_matches > 0

    @staticmethod
    def concat(parts: list[PerQueryMetrics]) -> PerQueryMetrics:
        return PerQueryMetrics(*(np.concatenate([getattr(p, f) for p in parts])
                                 for f in ("ap", "inp", "first_match", "num_matches")))


@dataclass
class LabelCodes:
    """Item ids and cameras as small integers, for fast comparisons.

    items: (N,) int64 codes; junk: code of item "-1" (or -2 if absent);
    cams: (N,) int64 camera ids, -1 for unknown, or None when camera ids are unknown everywhere.
    """

    query_items: np.ndarray
    gallery_items: np.ndarray
    query_cams: np.ndarray | None
    gallery_cams: np.ndarray | None
    junk: int
    vocabulary: np.ndarray = field(repr=False)


def encode_labels(query_items, gallery_items, query_cams=None, gallery_cams=None) -> LabelCodes:
    """Map string item ids of both sides onto one integer vocabulary."""
    q = np.asarray(query_items).astype(str)
    g = np.asarray(gallery_items).astype(str)
    vocab, codes = np.unique(np.concatenate([q, g]), return_inverse=True)
    junk_pos = np.searchsorted(vocab, JUNK_ITEM)
    junk = int(junk_pos) if junk_pos < len(vocab) and vocab[junk_pos] == JUNK_ITEM else -2
    use_cams = query_cams is not None and gallery_cams is not None
    return LabelCodes(
        query_items=codes[: len(q)].astype(np.int64),
        gallery_items=codes[len(q):].astype(np.int64),
        query_cams=np.asarray(query_cams, dtype=np.int64) if use_cams else None,
        gallery_cams=np.asarray(gallery_cams, dtype=np.int64) if use_cams else None,
        junk=junk,
        vocabulary=vocab,
    )


def rank_positions(scores: np.ndarray, positives: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in the ranking of one query, without sorting the gallery.

    scores: (G,) float, higher is better. positives: (P,) gallery indices of true matches kept in
    the ranking. excluded: (E,) gallery indices removed from the ranking (junk, same camera,
    and the positives themselves: everything that is not a negative).
    Returns (P,) int64 ranks in ranking order (ascending). Ties: lower gallery index first.
    """
    pos_scores = scores[positives]
    # ranking order of the positives: score descending, then gallery index ascending
    order = np.lexsort((positives, -pos_scores))
    positives, pos_scores = positives[order], pos_scores[order]
    asc = pos_scores[::-1]  # ascending thresholds for searchsorted
    n_pos = len(positives)

    def negatives_above(values: np.ndarray) -> np.ndarray:
        # count per positive (in ranking order) of `values` strictly above its score
        below = np.searchsorted(asc, values, side="left")  # positives strictly below each value
        hist = np.bincount(below, minlength=n_pos + 1)
        # values with `below == b` sit above asc[0..b-1]; asc[j] is positive n_pos-1-j in order
        above_asc = np.cumsum(hist[::-1])[::-1][1:]  # above_asc[j] = #values with below > j
        return above_asc[::-1]

    # only entries scoring at least the lowest positive can rank above a positive: one cheap
    # compare over the gallery, then the counting works on those candidates only
    candidates = np.flatnonzero(scores >= asc[0])
    cand_scores = scores[candidates]
    above = negatives_above(cand_scores) - negatives_above(scores[excluded])
    # stable tie-break: a negative with an equal score ranks above a positive if its index is lower
    ties = np.isin(cand_scores, pos_scores)
    if ties.any():
        tied = candidates[ties]
        tied = tied[~np.isin(tied, excluded)]
        for t in tied:
            hit = (pos_scores == scores[t]) & (positives > t)
            above += hit
    return np.arange(n_pos) + above


def average_precision(ranks: np.ndarray) -> float:
    """Non-interpolated AP from the ascending 0-based ranks of all true matches."""
    return float(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1)))


def query_metrics(scores: np.ndarray, q_item: int, q_cam: int | None, codes: LabelCodes,
                  item_index: dict[int, np.ndarray], junk_index: np.ndarray
                  ) -> tuple[float, float, int, int]:
    """Metrics of one query. scores: (G,). item_index: gallery indices per item code."""
    same_item = item_index.get(q_item, np.empty(0, np.int64))
    if q_cam is not None:  # ReID rule
        if q_item == codes.junk:
            return np.nan, np.nan, NO_MATCH, 0
        # unknown cameras (-1) never count as "the same camera"
        same_cam = (codes.gallery_cams[same_item] == q_cam) & (q_cam != -1)
        positives = same_item[~same_cam]
        excluded = np.concatenate([same_item, junk_index])
    else:  # fashion rule: nothing removed
        positives = excluded = same_item
    if len(positives) == 0:
        return np.nan, np.nan, NO_MATCH, 0
    ranks = rank_positions(scores, positives, excluded)
    return average_precision(ranks), len(ranks) / (ranks[-1] + 1), int(ranks[0]), len(ranks)


def group_indices(codes: np.ndarray) -> dict[int, np.ndarray]:
    """code -> sorted indices where it occurs. codes: (N,) int64."""
    order = np.argsort(codes, kind="stable")
    uniq, starts = np.unique(codes[order], return_index=True)
    return dict(zip(uniq.tolist(), np.split(order, starts[1:])))


def metrics_from_scores(scores: np.ndarray, codes: LabelCodes, query_rows: np.ndarray,
                        item_index: dict[int, np.ndarray] | None = None) -> PerQueryMetrics:
    """Per-query metrics for a chunk. scores: (C, G) float32 for queries `query_rows` (C,)."""
    if item_index is None:
        item_index = group_indices(codes.gallery_items)
    use_cams = codes.gallery_cams is not None
    junk_index = item_index.get(codes.junk, np.empty(0, np.int64)) if use_cams else np.empty(0, np.int64)
    out = np.empty((len(query_rows), 4))
    for i, row in enumerate(query_rows):
        q_cam = int(codes.query_cams[row]) if use_cams else None
        out[i] = query_metrics(scores[i], int(codes.query_items[row]), q_cam, codes, item_index, junk_index)
    return PerQueryMetrics(out[:, 0], out[:, 1], out[:, 2].astype(np.int64), out[:, 3].astype(np.int64))


def summarize(per_query: PerQueryMetrics, ranks=CMC_RANKS) -> dict:
    """Aggregate per-query metrics into the report's numbers (fractions in [0, 1])."""
    valid = per_query.valid
    n_valid = int(valid.sum())
    if n_valid == 0:
        return {"num_queries": len(valid), "num_valid_queries": 0, "mAP": 0.0, "mINP": 0.0,
                "cmc": {str(k): 0.0 for k in ranks}}
    first = per_query.first_match[valid]
    return {
        "num_queries": len(valid),
        "num_valid_queries": n_valid,
        "mAP": float(per_query.ap[valid].mean()),
        "mINP": float(per_query.inp[valid].mean()),
        "cmc": {str(k): float((first < k).mean()) for k in ranks},
    }


def cmc_curve(per_query: PerQueryMetrics, max_rank: int = 50) -> np.ndarray:
    """(max_rank,) CMC values at ranks 1..max_rank over valid queries."""
    first = per_query.first_match[per_query.valid]
    if len(first) == 0:
        return np.zeros(max_rank)
    return np.array([(first < k).mean() for k in range(1, max_rank + 1)])


def default_chunk_size(num_gallery: int, budget_bytes: int = 256 << 20) -> int:
    """Queries per chunk so that one (chunk, G) float32 score block stays within budget."""
    return int(max(1, min(4096, budget_bytes // max(1, 4 * num_gallery))))


def evaluate_instances(query: np.ndarray, gallery: np.ndarray, codes: LabelCodes,
                       chunk_size: int | None = None) -> PerQueryMetrics:
    """Instance mode: every gallery image is ranked. query: (Q, D), gallery: (G, D) float32,
    L2-normalised (cosine similarity). Works in query chunks; results do not depend on chunk size."""
    chunk_size = chunk_size or default_chunk_size(len(gallery))
    item_index = group_indices(codes.gallery_items)
    parts = []
    for start in range(0, len(query), chunk_size):
        rows = np.arange(start, min(start + chunk_size, len(query)))
        scores = query[rows] @ gallery.T
        parts.append(metrics_from_scores(scores, codes, rows, item_index))
    return PerQueryMetrics.concat(parts) if parts else _empty()


def _empty() -> PerQueryMetrics:
    z = np.empty(0)
    return PerQueryMetrics(z, z, z.astype(np.int64), z.astype(np.int64))


@dataclass
class ItemSums:
    """Per-item and per-(item, camera) embedding sums: what centroid mode needs.

    items: (I,) int64 item codes; sums: (I, D) float64; counts: (I,) int64;
    cam_items/cam_ids: (K,) int64 (item code, camera) pairs with cam_sums (K, D), cam_counts (K,).
    """

    items: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    cam_items: np.ndarray
    cam_ids: np.ndarray
    cam_sums: np.ndarray
    cam_counts: np.ndarray


def item_sums(vectors: np.ndarray, item_codes: np.ndarray, cams: np.ndarray | None) -> ItemSums:
    """Sum gallery vectors per item and per (item, camera). vectors: (G, D) float32."""
    items, inv = np.unique(item_codes, return_inverse=True)
    sums = np.zeros((len(items), vectors.shape[1]))
    np.add.at(sums, inv, vectors)
    counts = np.bincount(inv, minlength=len(items))
    if cams is None:
        e = np.empty(0, np.int64)
        return ItemSums(items, sums, counts, e, e, np.zeros((0, vectors.shape[1])), e)
    pairs, pinv = np.unique(np.stack([item_codes, cams], 1), axis=0, return_inverse=True)
    pinv = pinv.reshape(-1)
    cam_sums = np.zeros((len(pairs), vectors.shape[1]))
    np.add.at(cam_sums, pinv, vectors)
    return ItemSums(items, sums, counts, pairs[:, 0], pairs[:, 1], cam_sums,
                    np.bincount(pinv, minlength=len(pairs)))


def centroids_excluding_camera(s: ItemSums, camera: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Centroids that a query from `camera` sees: each item's mean over its images NOT from that
    camera, L2-normalised. Returns (centroids (I, D) float32, present (I,) bool)."""
    sums, counts = s.sums.copy(), s.counts.copy()
    if camera is not None and camera != -1 and len(s.cam_ids):
        sel = s.cam_ids == camera
        rows = np.searchsorted(s.items, s.cam_items[sel])
        sums[rows] -= s.cam_sums[sel]
        counts[rows] -= s.cam_counts[sel]
    present = counts > 0
    means = sums / np.maximum(counts, 1)[:, None]
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return (means / np.maximum(norms, 1e-12)).astype(np.float32), present


def evaluate_centroids(query: np.ndarray, codes: LabelCodes, sums: ItemSums,
                       chunk_size: int | None = None) -> PerQueryMetrics:
    """Centroid mode: the gallery is one centroid per item (DESIGN.md). With cameras, a query sees
    centroids built without its own camera's images; an item left with no image is absent.
    Junk items are never in the centroid gallery when cameras are known (ReID rule)."""
    chunk_size = chunk_size or default_chunk_size(len(sums.items))
    use_cams = codes.query_cams is not None
    cam_groups = group_indices(codes.query_cams) if use_cams else {None: np.arange(len(query))}
    result = np.empty((len(query), 4))
    for camera, rows in cam_groups.items():
        cents, present = centroids_excluding_camera(sums, camera)
        if use_cams:
            present &= sums.items != codes.junk
        keep = np.flatnonzero(present)
        sub_codes = LabelCodes(codes.query_items, sums.items[keep], None, None, codes.junk, codes.vocabulary)
        index = group_indices(sub_codes.gallery_items)
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start:start + chunk_size]
            scores = query[chunk] @ cents[keep].T
            m = metrics_from_scores(scores, sub_codes, chunk, index)
            result[chunk] = np.stack([m.ap, m.inp, m.first_match, m.num_matches], 1)
            if use_cams:
                # a junk query has no true match under the ReID rule
                result[chunk[codes.query_items[chunk] == codes.junk]] = (np.nan, np.nan, NO_MATCH, 0)
    return PerQueryMetrics(result[:, 0], result[:, 1], result[:, 2].astype(np.int64), result[:, 3].astype(np.int64))


def ranked_list_metrics(ranked_items: np.ndarray, ranked_cams: np.ndarray | None, q_item: int,
                        q_cam: int | None, junk: int, num_relevant: int, k: int
                        ) -> tuple[float, float, int, int]:
    """Metrics@k of one query from its retrieved top-k list (when the gallery is too large to rank
    whole). ranked_items/ranked_cams: (K,) int64 in rank order; num_relevant: true matches in the
    whole gallery after the rules. AP@k divides by min(k, num_relevant); INP@k is 0 unless every
    true match is within the list. first_match is k when no match was retrieved."""
    if num_relevant <= 0 or (q_cam is not None and q_item == junk):
        return np.nan, np.nan, NO_MATCH, 0
    keep = np.ones(len(ranked_items), bool)
    if q_cam is not None:
        keep &= ranked_items != junk
        if ranked_cams is not None:
            keep &= ~((ranked_items == q_item) & (ranked_cams == q_cam) & (q_cam != -1))
    hits = np.flatnonzero(ranked_items[keep][:k] == q_item)
    if len(hits) == 0:
        return 0.0, 0.0, k, num_relevant
    ap = float(np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / min(k, num_relevant))
    inp = num_relevant / (hits[-1] + 1) if len(hits) >= num_relevant else 0.0
    return ap, inp, int(hits[0]), num_relevant


def relevant_counts(codes: LabelCodes, centroid: bool = False) -> np.ndarray:
    """(Q,) number of true matches each query has in the whole gallery under the rules
    (instance: gallery images of its item not from its camera; centroid: 0 or 1)."""
    counts = np.bincount(codes.gallery_items, minlength=len(codes.vocabulary))[codes.query_items]
    if codes.query_cams is not None:
        base = max(codes.gallery_cams.max(), codes.query_cams.max()) + 2
        pairs = codes.gallery_items * base + codes.gallery_cams
        uniq, n = np.unique(pairs, return_counts=True)
        qpairs = codes.query_items * base + codes.query_cams
        pos = np.searchsorted(uniq, qpairs)
        pos = np.minimum(pos, len(uniq) - 1)
        same_cam = np.where((uniq[pos] == qpairs) & (codes.query_cams != -1), n[pos], 0)
        counts = counts - same_cam
        counts[codes.query_items == codes.junk] = 0
    return np.minimum(counts, 1) if centroid else counts
