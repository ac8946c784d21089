"""Incremental centroids: what changed between two embeddings outputs, and centroids updated
for the touched items only.

An output directory (the centroids pipeline's layout) holds ``centroids.parquet`` (the
centroids contract) and ``item_camera_sums.parquet`` (per (item, camera) float sums and counts,
index.centroids.aggregate). `diff_embeddings` finds the rows added and removed between two
embeddings outputs (by contracts.keys.row_keys) as pair sums; `update_centroids` applies them to
an earlier output, streaming every untouched item through unchanged; `compute_centroids` is the
full recompute. Memory: the row keys of both sides plus the touched pairs' sums.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.keys import KEY_COLUMNS, row_keys
from contracts.storage import atomic_dir
from contracts.vectors import (
    VectorFileError,
    arrow_to_embeddings,
    centroids_schema,
    check_schema,
    make_centroids_table,
    open_dataset,
)
from index.centroids import aggregate as C

__all__ = [
    "CENTROIDS_FILE",
    "SUMS_FILE",
    "CentroidStateError",
    "CentroidStats",
    "Delta",
    "compute_centroids",
    "diff_embeddings",
    "read_keys",
    "update_centroids",
]

CENTROIDS_FILE = "centroids.parquet"
SUMS_FILE = "item_camera_sums.parquet"


class CentroidStateError(RuntimeError):
    """An earlier centroids output that cannot be updated (files missing, sums that do not
    match its embeddings): rebuild it from scratch."""


def read_keys(emb_dir: str) -> np.ndarray:
    """Sorted (N,) int64 row keys (contracts.keys.row_keys) of every row of an embeddings output
    (labels and hashes only, no vectors)."""
    ds = open_dataset(emb_dir)
    cols = [c for c in KEY_COLUMNS if c in ds.schema.names]
    if "content_hash" not in cols:
        raise VectorFileError(f"{emb_dir}: no content_hash column (not written by embed)")
    keys = [row_keys(b) for b in ds.to_batches(columns=cols) if b.num_rows]
    return np.sort(np.concatenate(keys)) if keys else np.empty(0, np.int64)


def _not_in(keys: np.ndarray) -> Callable[[pa.RecordBatch], pa.Array]:
    """keep(batch): rows whose key is not in `keys` (sorted int64)."""
    def keep(b: pa.RecordBatch) -> pa.Array:
        return pa.array(~np.isin(row_keys(b), keys))
    return keep


@dataclass
class Delta:
    """Embeddings rows that differ between two outputs, as pair sums (see index.centroids.aggregate)."""

    added: C.PairSums
    removed: C.PairSums
    n_added: int
    n_removed: int

    @property
    def touched_items(self) -> np.ndarray:
        ids = np.concatenate([self.added.item_ids, self.removed.item_ids]).astype(str)
        return np.unique(ids).astype(object)


def _sums_of_rows(emb_dir: str, keep: Callable[[pa.RecordBatch], pa.Array], dim: int,
                  batch_size: int) -> tuple[C.PairSums, int]:
    """Pair sums of the rows of `emb_dir` where keep(batch) is true, streamed."""
    ds = open_dataset(emb_dir)
    cols = [c for c in (*KEY_COLUMNS, "embedding") if c in ds.schema.names]
    parts, n = [], 0
    for b in ds.to_batches(columns=cols, batch_size=batch_size):
        if b.num_rows == 0:
            continue
        mask = keep(b)
        if not pc.any(mask).as_py():
            continue
        sel = pa.Table.from_batches([b]).filter(mask)
        vecs = arrow_to_embeddings(sel.column("embedding"), what=f"{emb_dir}: embedding")
        cams = C.camera_codes(sel.column("camera_id") if "camera_id" in sel.column_names else None,
                              sel.num_rows)
        parts.append(C.partial_sums(np.asarray(sel.column("item_id").to_pylist(), dtype=object), cams, vecs))
        n += sel.num_rows
    return (C.combine(parts) if parts else C.empty_pair_sums(dim)), n


def diff_embeddings(old_dir: str, new_dir: str, batch_size: int = 65536) -> Delta:
    """Rows of `new_dir` whose key is not in `old_dir` (added: new or changed images) and rows
    of `old_dir` whose key is not in `new_dir` (removed: gone or changed images), summed per
    (item, camera). Memory: the keys of both sides plus the touched pairs' sums."""
    dim = check_schema(open_dataset(new_dir).schema, "embeddings", new_dir).dim
    old_keys, new_keys = read_keys(old_dir), read_keys(new_dir)
    added, n_added = _sums_of_rows(new_dir, _not_in(old_keys), dim, batch_size)
    removed, n_removed = _sums_of_rows(old_dir, _not_in(new_keys), dim, batch_size)
    return Delta(added, removed, n_added, n_removed)


@dataclass
class CentroidStats:
    items: int
    images: int
    pairs: int
    touched_items: int
    mode: str  # "full" | "incremental"


def _write_centroid_files(tmp: str, model: str, dim: int,
                          sums_tables: Iterator[pa.Table], cent_tables: Iterator[pa.Table]) -> tuple[int, int, int]:
    """Stream tables into tmp/item_camera_sums.parquet and tmp/centroids.parquet.
    Returns (items, images, pairs)."""
    items = images = pairs = 0
    with pq.ParquetWriter(os.path.join(tmp, SUMS_FILE), C.sums_schema(dim, model)) as sw:
        for t in sums_tables:
            if t.num_rows:
                sw.write_table(t.cast(C.sums_schema(dim, model)))
                pairs += t.num_rows
    with pq.ParquetWriter(os.path.join(tmp, CENTROIDS_FILE), centroids_schema(dim, model)) as cw:
        for t in cent_tables:
            if t.num_rows:
                cw.write_table(t.cast(centroids_schema(dim, model)))
                items += t.num_rows
                images += int(pc.sum(t.column("count")).as_py() or 0)
    return items, images, pairs


def _centroids_table(c: C.Centroids, model: str, dim: int) -> pa.Table:
    if len(c) == 0:
        return centroids_schema(dim, model).empty_table()
    return make_centroids_table(c.item_ids, c.embeddings, c.counts, c.camera_ids, model)


def compute_centroids(emb_dir: str, out_dir: str, batch_size: int = 65536) -> CentroidStats:
    """All items' centroids and pair sums of an embeddings output, streamed in batches (memory:
    one float64 sum per (item, camera) pair). Writes out_dir atomically."""
    meta = check_schema(open_dataset(emb_dir).schema, "embeddings", emb_dir)
    sums, n = _sums_of_rows(emb_dir, lambda b: pa.array(np.ones(b.num_rows, bool)), meta.dim, batch_size)
    if n == 0:
        raise VectorFileError(f"{emb_dir}: no embeddings rows")
    cents = C.finalize(sums)
    with atomic_dir(out_dir) as tmp:
        items, images, pairs = _write_centroid_files(
            tmp, meta.model, meta.dim, iter([C.pair_sums_to_table(sums, meta.model)]),
            iter([_centroids_table(cents, meta.model, meta.dim)]))
    return CentroidStats(items, images, pairs, items, "full")


def update_centroids(old_dir: str, delta: Delta, out_dir: str, model: str, dim: int,
                     batch_size: int = 65536) -> CentroidStats:
    """old centroids dir + delta -> out_dir (atomically). Pairs and centroids of untouched items
    are streamed through unchanged; touched items get old pairs + added - removed, and their
    centroids re-finalised (an item left with no image disappears)."""
    touched = delta.touched_items
    touched_set = pa.array(touched.astype(str), pa.string())
    old_sums_path = os.path.join(old_dir, SUMS_FILE)
    old_cents_path = os.path.join(old_dir, CENTROIDS_FILE)
    for p in (old_sums_path, old_cents_path):
        if not os.path.isfile(p):
            raise CentroidStateError(f"{p}: missing from the committed state; delete {os.path.dirname(old_dir)} "
                               "and state.json to rebuild from scratch")
    old_touched: list[C.PairSums] = []
    state: dict = {}

    def sums_tables() -> Iterator[pa.Table]:
        for b in pq.ParquetFile(old_sums_path).iter_batches(batch_size=batch_size):
            t = pa.Table.from_batches([b])
            hit = pc.is_in(t.column("item_id"), value_set=touched_set)
            if pc.any(hit).as_py():
                old_touched.append(C.pair_sums_from_table(t.filter(hit), old_sums_path))
            yield t.filter(pc.invert(hit))
        parts = [*old_touched, delta.added, C.negate(delta.removed)]
        try:
            new = C.combine(parts)
        except VectorFileError as e:
            raise CentroidStateError(f"{old_dir}: committed sums do not match the committed embeddings ({e})") from None
        state["touched"] = new
        yield C.pair_sums_to_table(new, model)

    def cent_tables() -> Iterator[pa.Table]:
        for b in pq.ParquetFile(old_cents_path).iter_batches(batch_size=batch_size):
            t = pa.Table.from_batches([b])
            yield t.filter(pc.invert(pc.is_in(t.column("item_id"), value_set=touched_set)))
        yield _centroids_table(C.finalize(state["touched"]), model, dim)

    with atomic_dir(out_dir) as tmp:
        items, images, pairs = _write_centroid_files(tmp, model, dim, sums_tables(), cent_tables())
    return CentroidStats(items, images, pairs, len(touched), "incremental")
