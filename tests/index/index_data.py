"""Synthetic vectors Parquet for the index tests (clustered, so IVF recall is meaningful)."""
from __future__ import annotations

import numpy as np

from contracts.vectors import (
    l2_normalize,
    make_centroids_table,
    make_embeddings_table,
    write_table_atomic,
)


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50, noise: float = 0.35) -> np.ndarray:
    """(n, dim) float32 unit vectors around `clusters` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)) * np.sqrt(1.0)
    return l2_normalize(x)


def write_vectors(path, x: np.ndarray, kind: str = "embeddings", model: str = "m1",
                  images_per_item: int = 3, prefix: str = "img") -> dict:
    """Write `x` as an embeddings (or centroids) Parquet file; returns the label arrays."""
    n = len(x)
    item_ids = [f"item{i // images_per_item}" for i in range(n)] if kind == "embeddings" else \
        [f"item{i}" for i in range(n)]
    if kind == "embeddings":
        image_ids = [f"{prefix}{i:06d}.jpg" for i in range(n)]
        table = make_embeddings_table(image_ids, item_ids, [i % 6 for i in range(n)], ["gallery"] * n, x, model)
    else:
        image_ids = None
        table = make_centroids_table(item_ids, x, [1] * n, [[0]] * n, model)
    write_table_atomic(table, str(path))
    return {"item_ids": np.asarray(item_ids, dtype=object),
            "image_ids": None if image_ids is None else np.asarray(image_ids, dtype=object)}


def assert_same_ranking(scores, ids, ref_scores, ref_ids, atol: float = 1e-5) -> None:
    """ids equal to the reference, except where two candidates' reference scores are within
    `atol` (float round-off may swap exact ties); scores equal to `atol`."""
    np.testing.assert_allclose(scores, ref_scores, atol=atol, rtol=0)
    diff = ids != ref_ids
    if diff.any():
        # a swap is only acceptable between (near-)tied scores
        assert np.all(np.abs(scores[diff] - ref_scores[diff]) <= atol)
        gaps = np.abs(np.diff(ref_scores, axis=1))
        assert gaps.min() <= atol, "ids differ although no scores are tied"
