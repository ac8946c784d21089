"""Evaluation of embedding files: from the Parquet contracts to the report of DESIGN.md.

`index.metrics` holds the numbers; this module connects them to VectorTables and reports.
"""
from __future__ import annotations

import numpy as np

from index import metrics as M
from index.vectors import VectorFileError, VectorTable

MODES = ("instance", "centroid")


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
            f"{r['mode']:<9} {str(r.get('rerank') or '-'):<12} "
            f"{r['num_valid_queries']:>4}/{r['num_queries']:<4} {r['mAP']:>7.4f} {r['mINP']:>7.4f} "
            + " ".join(f"{r['cmc'][k]:>6.4f}" for k in ranks))
    return "\n".join(lines)


def valid_fraction(per_query: M.PerQueryMetrics) -> float:
    return float(np.mean(per_query.valid)) if len(per_query.valid) else 0.0
