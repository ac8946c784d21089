"""Nightly re-index, the quality gate: score an index version on the validation queries, and
decide whether a new version may replace the published one.

`evaluate_version` searches the validation queries against a version (top-k) and scores the
ranked lists; `gate_decision` compares two such reports (same queries, same k, same scoring),
the gallery sizes and the new version's recall.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contracts.vectors import VectorTable, camera_array, open_dataset
from index.ann.versions import IndexHome
from index.nightly.state import ReindexError

__all__ = [
    "GalleryLabels",
    "GateDecision",
    "evaluate_version",
    "gallery_labels",
    "gate_decision",
    "gate_map",
    "index_labels",
    "version_recall",
]


@dataclass
class GalleryLabels:
    """Per-image labels of the gallery an index version was built from (for relevant counts and
    the ReID rule). cams: (N,) int64 (-1 unknown) or None."""

    item_ids: np.ndarray
    image_ids: np.ndarray | None
    cams: np.ndarray | None


def gallery_labels(emb_dir: str) -> GalleryLabels:
    """Labels of an embeddings output (no vectors read)."""
    ds = open_dataset(emb_dir)
    cols = [c for c in ("image_id", "item_id", "camera_id") if c in ds.schema.names]
    t = ds.to_table(columns=cols)
    cams = camera_array(t.column("camera_id")) if "camera_id" in t.column_names else None
    return GalleryLabels(np.asarray(t.column("item_id").to_pylist(), dtype=object),
                         np.asarray(t.column("image_id").to_pylist(), dtype=object), cams)


def index_labels(home: IndexHome, version: str) -> GalleryLabels:
    """Labels from a version's ids tables (when its source embeddings are unknown): no cameras."""
    from index.ann.search import read_ids_tables

    man = home.manifest(version)
    t = read_ids_tables(home.version_dir(version), man["num_shards"])
    images = t.column("image_id")
    return GalleryLabels(np.asarray(t.column("item_id").to_pylist(), dtype=object),
                         None if images.null_count == len(images) else
                         np.asarray(images.to_pylist(), dtype=object), None)


def evaluate_version(home: IndexHome, version: str, queries: VectorTable, labels: GalleryLabels,
                     k: int = 100, use_cameras: bool = True) -> dict:
    """Search `queries` against index `version` (top-k) and score the ranked lists
    (index.evaluation.protocol.per_query_metrics_from_results). Returns the evaluation report (mAP@k over
    valid queries etc.) plus version, k, model, num_vectors, `scoring` (what the figure measures:
    an index's centroids are all-camera ones, not the protocol's) and `gate_mAP`: the mean AP@k
    over ALL validation queries, a query with no match in this version scoring 0, which is the
    figure two versions are compared on (same queries, same k, whatever each gallery holds)."""
    from contracts.results import make_results_table
    from index.ann.search import open_index
    from index.evaluation.protocol import (
        make_report,
        per_query_metrics_from_results,
        results_scoring,
    )

    with open_index(home.path, version=version) as idx:
        if queries.meta.model != idx.model:
            raise ReindexError(f"validation queries come from model {queries.meta.model}, index version "
                               f"{version} from model {idx.model}")
        n_vectors = len(idx)
        hits = idx.search(queries.vectors, max(1, min(k, n_vectors)))
        model = idx.model
    results = make_results_table(queries.image_ids, hits.item_ids, hits.image_ids, hits.scores, hits.valid)
    q_cams = queries.camera_ids if use_cameras else None
    g_cams = labels.cams if use_cameras else None
    image_ids = labels.image_ids if labels.image_ids is not None else np.full(len(labels.item_ids), None, object)
    # k is the gate's k, not capped by this gallery's size: a shorter list just holds fewer hits
    per_query, _, mode = per_query_metrics_from_results(
        results, queries.item_ids, queries.image_ids, q_cams, labels.item_ids, image_ids, g_cams, k)
    ap = np.where(per_query.valid, np.nan_to_num(per_query.ap), 0.0)
    return make_report(per_query, mode, None, k=k, version=version, model=model, num_vectors=n_vectors,
                       scoring=results_scoring(mode, q_cams is not None and g_cams is not None),
                       gate_mAP=float(ap.sum() / max(len(ap), 1)))


@dataclass
class GateDecision:
    passed: bool
    reason: str
    new: dict
    old: dict | None
    recall: float | None


def gate_decision(new: dict, old: dict | None, recall: float | None, target_recall: float,
                  max_drop: float, max_shrink: float = 1.0) -> GateDecision:
    """Pass when the new version has valid validation queries, its index recall reaches the
    target, its gallery did not shrink by more than `max_shrink` (a fraction of the published
    one's vectors), and its gate mAP (`gate_mAP`: mean AP@k over all validation queries, a query
    that lost its matches scoring 0) is at most `max_drop` below the published one's (`old`,
    None = nothing published yet). Both reports must score the same way with the same k and
    queries; otherwise ReindexError (the figures are not comparable)."""
    if new["num_valid_queries"] == 0:
        return GateDecision(False, f"none of the {new['num_queries']} validation queries has a true match "
                                   "in the new version", new, old, recall)
    if recall is not None and recall < target_recall:
        return GateDecision(False, f"index recall {recall:.4f} is below the target {target_recall}",
                            new, old, recall)
    if old is None:
        return GateDecision(True, f"validation mAP@{new.get('k')} {gate_map(new):.4f} over "
                                  f"{new['num_queries']} queries; nothing published yet", new, old, recall)
    for key in ("k", "num_queries", "scoring"):
        if key in old and key in new and old[key] != new[key]:
            raise ReindexError(f"cannot compare with published version {old.get('version')}: its validation "
                               f"figure has {key}={old[key]!r}, the new one {key}={new[key]!r}; pass --published-validation "
                               "to evaluate it again, or publish by hand (index_versions.py publish)")
    old_n, new_n = old.get("num_vectors"), new.get("num_vectors")
    if old_n and new_n is not None and new_n < (1 - max_shrink) * old_n - 1e-9:
        return GateDecision(False, f"the gallery shrank from {old_n} to {new_n} vectors "
                                   f"({1 - new_n / old_n:.0%} > --max-shrink {max_shrink:.0%})", new, old, recall)
    lost = (new["num_queries"] - new["num_valid_queries"]
            - (old.get("num_queries", 0) - old.get("num_valid_queries", 0)))
    lost_note = f"; {lost} validation queries lost their matches (scored 0)" if lost > 0 else ""
    drop = gate_map(old) - gate_map(new)
    if drop > max_drop + 1e-12:
        return GateDecision(False, f"validation mAP@{new.get('k')} fell from {gate_map(old):.4f} "
                                   f"(version {old.get('version')}) to {gate_map(new):.4f} "
                                   f"(drop {drop:.4f} > max drop {max_drop}){lost_note}", new, old, recall)
    return GateDecision(True, f"validation mAP@{new.get('k')} {gate_map(new):.4f} vs published "
                              f"{gate_map(old):.4f} over {new['num_queries']} queries "
                              f"(drop {max(drop, 0):.4f} <= {max_drop}){lost_note}", new, old, recall)


def gate_map(report: dict) -> float:
    """The figure the gate compares: gate_mAP (all queries, no match = 0). Reports recorded before
    it existed only hold the valid-query mAP, rescaled here to all queries."""
    if "gate_mAP" in report:
        return float(report["gate_mAP"])
    if "num_valid_queries" not in report or "num_queries" not in report:
        return float(report["mAP"])
    return float(report["mAP"]) * report["num_valid_queries"] / max(report["num_queries"], 1)


def version_recall(manifest: dict) -> float | None:
    """The achieved recall recorded by build_index (1.0 for exact indexes)."""
    rec = manifest.get("recall") or {}
    vals = [v for key, v in rec.items() if key.startswith("recall@")]
    if vals:
        return float(vals[0])
    return 1.0 if manifest.get("exact") else None
