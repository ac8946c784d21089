"""Evaluation with re-ranking, plus the ranked lists of sample queries for reports.

`evaluate_ranked(query, gallery, mode, config)` scores every query against the whole gallery
(exact metrics of index.evaluation.metrics: mAP, mINP, CMC) after re-ranking by `config`
(index.rerank.chain.RerankConfig: DBA, then QE, then k-reciprocal or diffusion, run by the
shared chain index.rerank.chain.PreparedGallery with exact flat searches). Without re-ranking it computes
exactly what index.evaluation.protocol.per_query_metrics computes.

How the re-ranked scores of a query over the whole gallery are formed:
- QE / DBA only: cosine of the expanded query with the (augmented) gallery vectors.
- k-reciprocal, "dense" form (gallery up to `dense_max` vectors, default 20,000): the exact
  final distances (index.rerank.kreciprocal.k_reciprocal_from_embeddings, the reference's result), negated.
- k-reciprocal, "sparse" form (larger galleries): index.rerank.kreciprocal.k_reciprocal_sparse gives the
  top `config.topk` per query; every other gallery entry gets (1 - lambda) + lambda * d(q, g),
  the final distance of an entry that shares no k-reciprocal support with the query (Jaccard
  distance 1). Entries outside the list with some support would score at most that, so the
  ranking is exact within the list and ordered by the original distance after it.
- Junk (item "-1") takes no part in re-ranking: it is left out of the vectors that re-ranking
  sees and scores -inf (it is removed from the ranking by the ReID rule anyway).

Centroid mode: with camera ids every query camera sees its own centroid gallery (each item's
images not taken by that camera; junk absent; DESIGN.md). Re-ranking runs once per query
camera on that gallery, with that camera's queries as the query set (k-reciprocal's union is
those queries plus their centroid gallery), so no same-camera image reaches a query through
re-ranking either. Without cameras there is one centroid gallery and one re-ranking.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from index.evaluation import metrics as M
from index.evaluation.protocol import check_compatible, label_codes
from index.rerank.chain import FlatBackend, PreparedGallery, RerankConfig
from index.rerank.diffusion import conjugate_gradient, query_vector_block
from index.rerank.kreciprocal import (
    farthest_in_sample,
    k_reciprocal_from_embeddings,
    resolve_max_distance,
)

DENSE_MAX = 20_000
JUNK_ITEM = M.JUNK_ITEM


@dataclass
class RankedSample:
    """Top of one sample query's ranking (as the metric saw it, ignored entries included).

    query_row: row in the query set; gallery_rows: (n,) int64 rows of the gallery (instance
    mode) or a representative gallery image of each listed item (centroid mode, -1 if none);
    items: (n,) object item ids; status: "match", "wrong" or "ignored" (same item and camera,
    or junk) per entry; scores: (n,) float32."""

    query_row: int
    gallery_rows: np.ndarray
    items: np.ndarray
    status: list[str]
    scores: np.ndarray


@dataclass
class RankedEvaluation:
    per_query: M.PerQueryMetrics
    form: str | None  # "dense" / "sparse" for k-reciprocal, else None
    samples: list[RankedSample] = field(default_factory=list)


def uses(config: RerankConfig | None, name: str) -> bool:
    return config is not None and name in config.methods


def is_reranked(config: RerankConfig | None) -> bool:
    return config is not None and tuple(config.methods) != ("none",)


def choose_sample_rows(codes: M.LabelCodes, n: int) -> np.ndarray:
    """n query rows spread evenly over the queries that have a true match (deterministic)."""
    valid = np.flatnonzero(M.relevant_counts(codes) > 0)
    if n <= 0 or len(valid) == 0:
        return np.zeros(0, np.int64)
    pick = np.unique(np.linspace(0, len(valid) - 1, min(n, len(valid))).round().astype(np.int64))
    return valid[pick]


class _Scorer:
    """Re-ranked scores of query rows over the whole gallery (see module docstring)."""

    def __init__(self, query: np.ndarray, gallery: np.ndarray, config: RerankConfig | None,
                 keep: np.ndarray | None, dense_max: int = DENSE_MAX, form: str = "auto"):
        self.n_gallery = len(gallery)
        self.keep = None if keep is None or keep.all() else np.asarray(keep, bool)
        self.form = None
        self.final = None
        self.sparse = None
        self.graph = None
        if not is_reranked(config):
            self.q, self.g, self.keep = query, gallery, None
            return
        rows = np.arange(len(gallery)) if self.keep is None else np.flatnonzero(self.keep)
        self.rows = rows
        if len(rows) == 0:  # only junk: nothing to re-rank, every score is -inf
            self.q, self.g = np.ascontiguousarray(query, np.float32), np.array(gallery, np.float32, copy=True)
            return
        # the shared chain (DBA, QE) with exact flat searches; only the whole-gallery scoring
        # of the final stage is the evaluator's own
        prepared = PreparedGallery(gallery, config, FlatBackend(), self.keep)
        q, g = prepared.expand(query), prepared.vectors
        full_g = np.array(gallery, np.float32, copy=True)
        full_g[rows] = g
        self.q, self.g = q, full_g
        if uses(config, "diffusion"):
            self.g_search, self.graph, self.config = prepared.search, prepared.graph, prepared.config
            return
        if not uses(config, "kreciprocal"):
            return
        self.form = ("dense" if len(g) <= dense_max else "sparse") if form == "auto" else form
        if self.form == "dense":
            self.final = k_reciprocal_from_embeddings(q, g, config.k1, config.k2, config.lambda_value)
        elif self.form == "sparse":
            self.sparse = prepared.rank_kept(q)  # ids: kept rows
            self.lam = np.float32(config.lambda_value)
            self.far = _farthest(q, g, config.max_distance)
        else:
            raise ValueError(f"unknown k-reciprocal form {form!r}: choose auto, dense or sparse")

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), G) float32, higher is better; -inf for junk when re-ranking."""
        if self.final is not None:
            out = np.full((len(rows), self.n_gallery), -np.inf, np.float32)
            out[:, self.rows] = -self.final[rows]
            return out
        s = self.q[rows] @ self.g.T
        if self.graph is not None:
            s = self._diffusion_scores(rows, s)
        if self.sparse is not None:
            d = np.maximum(np.float32(2.0) - np.float32(2.0) * s, np.float32(0.0)) / self.far[rows, None]
            s = -((np.float32(1.0) - self.lam) + self.lam * d)
            listed = self.sparse.ids[rows]
            r, c = np.nonzero(listed >= 0)
            s[r, self.rows[listed[r, c]]] = -self.sparse.distances[rows][r, c]
        if self.keep is not None:
            s[:, ~self.keep] = -np.inf
        return s.astype(np.float32, copy=False)

    def _diffusion_scores(self, rows: np.ndarray, cos: np.ndarray) -> np.ndarray:
        """Diffusion on the whole gallery graph (index.rerank.diffusion, online form): nodes the query
        reaches rank first by their diffusion score f > 0, the rest after them by cosine."""
        c = self.config
        sims, ids = self.g_search(self.q[rows], min(c.diffusion_query_k, len(self.rows)))
        y = query_vector_block(ids, sims, self.graph.n, c.diffusion_gamma, c.diffusion_query_k)
        f = conjugate_gradient(self.graph, y, c.diffusion_alpha, maxiter=20, dtype=np.float32).T
        out = cos - np.float32(3.0)                      # in [-4, -2]: below every f > 0
        sub = out[:, self.rows]
        reached = f > 0
        sub[reached] = f[reached]
        out[:, self.rows] = sub
        return out


def _farthest(q: np.ndarray, g: np.ndarray, max_distance, chunk: int = 2048) -> np.ndarray:
    """Each query's row normaliser as k_reciprocal_sparse computes it: (Q,) float32."""
    max_distance = resolve_max_distance(max_distance, len(q) + len(g))
    if max_distance == "sample":
        return np.maximum(farthest_in_sample(np.concatenate([q, g]), sample_size=8192)[:len(q)], 1e-12)
    if max_distance != "search":
        return np.full(len(q), max(float(max_distance), 1e-12), np.float32)
    out = np.empty(len(q), np.float32)
    for s in range(0, len(q), chunk):
        e = min(s + chunk, len(q))
        m = np.minimum((q[s:e] @ q.T).min(axis=1), (q[s:e] @ g.T).min(axis=1))
        out[s:e] = 2.0 + 2.0 * (-m)
    return np.maximum(out, np.float32(1e-12))


def _status(items: np.ndarray, cams: np.ndarray | None, q_item: int, q_cam: int | None, junk: int,
            reid: bool) -> list[str]:
    out = []
    for i, it in enumerate(items):
        if reid and it == junk:
            out.append("ignored")
        elif it == q_item:
            same_cam = reid and cams is not None and q_cam is not None and q_cam != -1 and cams[i] == q_cam
            out.append("ignored" if same_cam else "match")
        else:
            out.append("wrong")
    return out


def _top(scores_row: np.ndarray, n: int) -> np.ndarray:
    finite = np.flatnonzero(np.isfinite(scores_row))
    n = min(n, len(finite))
    if n == 0:
        return np.zeros(0, np.int64)
    part = finite[np.argpartition(-scores_row[finite], n - 1)[:n]] if n < len(finite) else finite
    return part[np.lexsort((part, -scores_row[part]))]  # score descending, then gallery order


def evaluate_ranked(query, gallery, mode: str, config: RerankConfig | None = None,
                    chunk_size: int | None = None, sample_rows=(), top_n: int = 10,
                    dense_max: int = DENSE_MAX, form: str = "auto") -> RankedEvaluation:
    """Per-query metrics of VectorTable `query` against VectorTable `gallery` in "instance" or
    "centroid" mode after re-ranking by `config` (None or methods ("none",): plain cosine).
    sample_rows: query rows whose top `top_n` list is returned (RankedEvaluation.samples).
    form: k-reciprocal form, "auto" (dense up to `dense_max` gallery vectors), "dense", "sparse"."""
    if mode not in ("instance", "centroid"):
        raise ValueError(f"unknown mode {mode!r}: choose instance or centroid")
    check_compatible(query, gallery)
    codes = label_codes(query, gallery)
    sample_rows = np.asarray(sample_rows, np.int64)
    if mode == "instance":
        return _instances(query.vectors, gallery.vectors, codes, config, chunk_size, sample_rows, top_n,
                          dense_max, form)
    return _centroids(query.vectors, gallery.vectors, codes, config, chunk_size, sample_rows, top_n,
                      dense_max, form)


def _instances(q, g, codes, config, chunk_size, sample_rows, top_n, dense_max, form) -> RankedEvaluation:
    keep = codes.gallery_items != codes.junk
    scorer = _Scorer(q, g, config, keep, dense_max, form)
    chunk_size = chunk_size or M.default_chunk_size(len(g))
    item_index = M.group_indices(codes.gallery_items)
    reid = codes.gallery_cams is not None
    parts, samples = [], []
    for start in range(0, len(q), chunk_size):
        rows = np.arange(start, min(start + chunk_size, len(q)))
        scores = scorer.scores(rows)
        parts.append(M.metrics_from_scores(scores, codes, rows, item_index))
        for row in sample_rows[(sample_rows >= rows[0]) & (sample_rows <= rows[-1])]:
            s = scores[row - rows[0]]
            top = _top(s, top_n)
            q_cam = int(codes.query_cams[row]) if reid else None
            status = _status(codes.gallery_items[top], codes.gallery_cams[top] if reid else None,
                             int(codes.query_items[row]), q_cam, codes.junk, reid)
            samples.append(RankedSample(int(row), top, codes.vocabulary[codes.gallery_items[top]].astype(object),
                                        status, s[top]))
    pq_ = M.PerQueryMetrics.concat(parts) if parts else M.PerQueryMetrics(*(np.empty(0),) * 2,
                                                                          *(np.empty(0, np.int64),) * 2)
    return RankedEvaluation(pq_, scorer.form, samples)


def _representatives(codes: M.LabelCodes, camera) -> dict[int, int]:
    """item code -> first gallery row of that item not taken by `camera` (for pictures)."""
    ok = np.ones(len(codes.gallery_items), bool)
    if camera is not None and camera != -1 and codes.gallery_cams is not None:
        ok = codes.gallery_cams != camera
    rows = np.flatnonzero(ok)
    items, first = np.unique(codes.gallery_items[rows], return_index=True)
    return dict(zip(items.tolist(), rows[first].tolist()))


def _centroids(q, g, codes, config, chunk_size, sample_rows, top_n, dense_max, form) -> RankedEvaluation:
    sums = M.item_sums(g, codes.gallery_items, codes.gallery_cams)
    chunk_size = chunk_size or M.default_chunk_size(len(sums.items))
    use_cams = codes.query_cams is not None
    cam_groups = M.group_indices(codes.query_cams) if use_cams else {None: np.arange(len(q))}
    result = np.empty((len(q), 4))
    forms, samples = set(), []
    for camera, rows in cam_groups.items():
        cents, present = M.centroids_excluding_camera(sums, camera)
        if use_cams:
            present &= sums.items != codes.junk
        keep = np.flatnonzero(present)
        sub_codes = M.LabelCodes(codes.query_items, sums.items[keep], None, None, codes.junk, codes.vocabulary)
        index = M.group_indices(sub_codes.gallery_items)
        scorer = _Scorer(q[rows], cents[keep], config, None, dense_max, form) if len(keep) else None
        if scorer is not None and scorer.form:
            forms.add(scorer.form)
        reps = _representatives(codes, camera)
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start:start + chunk_size]
            if scorer is None:
                scores = np.zeros((len(chunk), 0), np.float32)
            elif is_reranked(config):
                scores = scorer.scores(np.arange(start, start + len(chunk)))
            else:
                scores = q[chunk] @ cents[keep].T  # exactly index.evaluation.metrics.evaluate_centroids
            m = M.metrics_from_scores(scores, sub_codes, chunk, index)
            result[chunk] = np.stack([m.ap, m.inp, m.first_match, m.num_matches], 1)
            if use_cams:
                result[chunk[codes.query_items[chunk] == codes.junk]] = (np.nan, np.nan, M.NO_MATCH, 0)
            for row in np.intersect1d(sample_rows, chunk):
                s = scores[int(np.searchsorted(chunk, row))]
                top = _top(s, top_n)
                items = sub_codes.gallery_items[top]
                status = _status(items, None, int(codes.query_items[row]), None, codes.junk, use_cams)
                samples.append(RankedSample(int(row), np.array([reps.get(int(i), -1) for i in items], np.int64),
                                            codes.vocabulary[items].astype(object), status, s[top]))
    pq_ = M.PerQueryMetrics(result[:, 0], result[:, 1], result[:, 2].astype(np.int64), result[:, 3].astype(np.int64))
    samples.sort(key=lambda x: x.query_row)
    form_out = None if not forms else ("sparse" if "sparse" in forms else "dense")
    return RankedEvaluation(pq_, form_out, samples)
