"""Training's validation scores, computed with index's metrics from the job (model never imports
index): instance and centroid mAP / Rank-1 of the validation query against the gallery.
"""
from __future__ import annotations

import numpy as np

__all__ = ["reid_metrics"]


def reid_metrics(qidx, gidx, merged: dict) -> dict:
    """Instance and centroid mAP / Rank-1 (DESIGN evaluation protocol via index.evaluation.metrics).

    qidx, gidx: SampleIndex (or anything with `item_id` (N,) str and `camera_id` (N,) int arrays,
    -1 = unknown camera) of the query and gallery shards. merged: {"query": (rows (Q,) int,
    embeddings (Q, D) float32), "gallery": (rows (G,) int, embeddings (G, D) float32)}, rows
    indexing qidx / gidx. Cameras are used only when some row has one.
    """
    from index.evaluation import metrics as M

    qrows, q = merged["query"]
    grows, g = merged["gallery"]
    qc, gc = np.asarray(qidx.camera_id)[qrows], np.asarray(gidx.camera_id)[grows]
    cams = (qc >= 0).any() or (gc >= 0).any()
    codes = M.encode_labels(np.asarray(qidx.item_id)[qrows], np.asarray(gidx.item_id)[grows],
                            qc if cams else None, gc if cams else None)
    inst = M.summarize(M.evaluate_instances(q, g, codes))
    cent = M.summarize(M.evaluate_centroids(
        q, codes, M.item_sums(g, codes.gallery_items, codes.gallery_cams)))
    return {"instance_mAP": inst["mAP"], "instance_rank1": inst["cmc"]["1"],
            "centroid_mAP": cent["mAP"], "centroid_rank1": cent["cmc"]["1"],
            "num_valid_queries": inst["num_valid_queries"]}
