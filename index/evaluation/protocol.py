"""Evaluation of embedding files: from the Parquet contracts to the report of DESIGN.md.

`index.evaluation.metrics` holds the numbers; this module connects them to VectorTables and reports.
"""
from __future__ import annotations

import numpy as np

from contracts.vectors import VectorFileError, VectorTable
from index.evaluation import metrics as M

MODES = ("instance", "centroid")
# What a figure measures. The protocol's centroid mode builds, for each query, an item's centroid
# from its gallery images NOT taken by the query's camera; an index's centroids are built from all
# of them, so scoring an index's centroid lists counts same-camera matches the protocol removes
# (an inflated figure, never to be compared with a protocol one).
SCORING_PROTOCOL = "protocol"
SCORING_INDEX_CENTROIDS = "index-centroids-all-cameras"


def results_scoring(mode: str, cameras_known: bool) -> str:
    """The `scoring` label of metrics computed from retrieved lists (see SCORING_*)."""
    return SCORING_INDEX_CENTROIDS if mode == "centroid" and cameras_known else SCORING_PROTOCOL


def check_compatible(query: VectorTable, gallery: VectorTable) -> None:
    """Same model and dimension on both sides, and neither side empty."""
    if len(query) == 0:
        raise VectorFileError("query set is empty")
    if len(gallery) == 0:
        raise VectorFileError("gallery is empty")
    if query.meta.dim != gallery.meta.dim:
        raise VectorFileError(f"query dimension {query.meta.dim} != gallery dimension {gallery.meta.dim}")
    if query.meta.model != gallery.meta.model:
        raise VectorFileError(
            f"query embeddings come from model {query.meta.model!r}, gallery from {gallery.meta.model!r}")


def label_codes(query: VectorTable, gallery: VectorTable) -> M.LabelCodes:
    """ReID rule when both sides know their cameras, fashion rule otherwise."""
    return M.encode_labels(query.item_ids, gallery.item_ids, query.camera_ids, gallery.camera_ids)


def per_query_metrics(query: VectorTable, gallery: VectorTable, mode: str,
                      chunk_size: int | None = None) -> M.PerQueryMetrics:
    """Per-query metrics of `query` against an embeddings `gallery` in instance or centroid mode."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    check_compatible(query, gallery)
    codes = label_codes(query, gallery)
    if mode == "instance":
        return M.evaluate_instances(query.vectors, gallery.vectors, codes, chunk_size)
    sums = M.item_sums(gallery.vectors, codes.gallery_items, codes.gallery_cams)
    return M.evaluate_centroids(query.vectors, codes, sums, chunk_size)


def make_report(per_query: M.PerQueryMetrics, mode: str, rerank: str | None = None, **extra) -> dict:
    """The evaluation report of DESIGN.md (plus any `extra` keys)."""
    return {"mode": mode, "rerank": rerank, **M.summarize(per_query), **extra}


def format_report(report: dict) -> str:
    """A short human-readable table of one or more reports."""
    reports = report if isinstance(report, list) else [report]
    ranks = list(reports[0]["cmc"])
    head = f"{'mode':<9} {'rerank':<12} {'queries':>9} {'mAP':>7} {'mINP':>7} " + " ".join(
        f"{'R' + k:>6}" for k in ranks)
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r['mode']:<9} {r.get('rerank') or '-'!s:<12} "
            f"{r['num_valid_queries']:>4}/{r['num_queries']:<4} {r['mAP']:>7.4f} {r['mINP']:>7.4f} "
            + " ".join(f"{r['cmc'][k]:>6.4f}" for k in ranks))
    for r in reports:
        if r.get("scoring", SCORING_PROTOCOL) != SCORING_PROTOCOL:
            lines.append(f"note: {r['mode']} scored as {r['scoring']}: the index's centroids include the "
                         "query camera's images, so this is NOT the ReID protocol figure (evaluate.py "
                         "--mode centroid on the embeddings gives that); do not compare the two")
    return "\n".join(lines)


def valid_fraction(per_query: M.PerQueryMetrics) -> float:
    return float(np.mean(per_query.valid)) if len(per_query.valid) else 0.0


def per_query_metrics_from_results(results, query_item_ids, query_image_ids, query_cams,
                                   gallery_item_ids, gallery_image_ids, gallery_cams,
                                   k: int | None = None) -> tuple[M.PerQueryMetrics, int, str]:
    """Metrics@k from retrieved lists (query-results contract) when the gallery is too large for
    exact evaluation. results: pa.Table (query_id, rank, item_id, image_id, score).
    Returns (per-query metrics, k, mode) where mode is "centroid" when image_id is null."""
    import pyarrow.compute as pc

    if results.num_rows == 0:
        raise VectorFileError("results are empty")
    results = results.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    centroid = results.column("image_id").null_count == results.num_rows
    codes = M.encode_labels(query_item_ids, gallery_item_ids, query_cams, gallery_cams)
    vocab = {v: i for i, v in enumerate(codes.vocabulary.tolist())}
    res_items = np.array([vocab.get(x, -3) for x in results.column("item_id").to_pylist()], np.int64)
    res_cams = None
    if codes.gallery_cams is not None and not centroid:
        cam_of = dict(zip(list(gallery_image_ids), codes.gallery_cams.tolist()))
        res_cams = np.array([cam_of.get(x, -1) for x in results.column("image_id").to_pylist()], np.int64)
    qids = results.column("query_id")
    uniq, starts = np.unique(np.asarray(qids.to_pylist(), dtype=object), return_index=True)
    bounds = dict(zip(uniq.tolist(), zip(starts, np.append(starts[1:], len(qids)))))
    lengths = pc.value_counts(qids).field("counts").to_numpy()
    k = int(k or lengths.max())
    n_rel = M.relevant_counts(codes, centroid=centroid)
    out = np.empty((len(query_item_ids), 4))
    for row, qid in enumerate(query_image_ids):
        a, b = bounds.get(qid, (0, 0))
        q_cam = int(codes.query_cams[row]) if codes.query_cams is not None else None
        out[row] = M.ranked_list_metrics(res_items[a:b], None if res_cams is None else res_cams[a:b],
                                         int(codes.query_items[row]), q_cam, codes.junk, int(n_rel[row]), k)
    pq_ = M.PerQueryMetrics(out[:, 0], out[:, 1], out[:, 2].astype(np.int64), out[:, 3].astype(np.int64))
    return pq_, k, "centroid" if centroid else "instance"
