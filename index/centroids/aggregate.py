"""Per-item centroids as a mergeable aggregation: partial sums per batch, combine, finalise.

The unit of aggregation is the (item, camera) pair: its vector sum and image count. Item-level
sums are the sums over an item's pairs, so one set of pair sums serves both

- the centroids contract (mean of the item's embeddings, L2-normalised; DESIGN.md), and
- centroid-mode evaluation with camera exclusion (an item's centroid without one camera's
  images is (item sum - pair sum) / (item count - pair count)), and
- nightly updates of touched items only: add the new images' pair sums, subtract the removed
  ones' (``apply_delta``), re-finalise only those items.

Everything here is plain numpy/pyarrow, so the distributed job (pipelines/centroids.py) and the
tests run the very same functions. Sums are accumulated in float64: a centroid is then exact to
float32 rounding whatever the order batches were combined in.

Unknown cameras are ``UNKNOWN_CAMERA`` (-1) in numpy and null in Parquet.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contracts.vectors import META_KEY, VectorFileError, check_vectors

UNKNOWN_CAMERA = -1
SUMS_KIND = "item_camera_sums"


@dataclass
class PairSums:
    """Embedding sums per (item, camera) pair, sorted by (item_id, camera_id), pairs unique.

    item_ids: (K,) object (str); camera_ids: (K,) int64, UNKNOWN_CAMERA for unknown;
    sums: (K, D) float64; counts: (K,) int64 (> 0 after ``combine``).
    """

    item_ids: np.ndarray
    camera_ids: np.ndarray
    sums: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    def take(self, rows: np.ndarray) -> PairSums:
        return PairSums(self.item_ids[rows], self.camera_ids[rows], self.sums[rows], self.counts[rows])


@dataclass
class Centroids:
    """One row per item, sorted by item_id. embeddings: (I, D) float32 L2-normalised means;
    counts: (I,) int32; camera_ids: list of I sorted lists of known camera ids (int)."""

    item_ids: np.ndarray
    embeddings: np.ndarray
    counts: np.ndarray
    camera_ids: list[list[int]]
    sums: np.ndarray  # (I, D) float64 item sums, before the mean (for incremental updates)

    def __len__(self) -> int:
        return len(self.item_ids)


def empty_pair_sums(dim: int) -> PairSums:
    return PairSums(np.empty(0, object), np.empty(0, np.int64), np.zeros((0, dim)), np.empty(0, np.int64))


def _encode_pairs(item_ids: np.ndarray, camera_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by (item, camera). Returns (order, starts, first): `order` sorts rows by
    (item_id, camera_id), `starts` are the group starts within that order (for reduceat),
    `first` is the original row index of each group's first row."""
    # Hash the strings once (Arrow dictionary encoding), then sort small integers, not strings.
    enc = pc.dictionary_encode(pa.array(item_ids, pa.string()))
    dictionary = np.asarray(enc.dictionary.to_pylist(), dtype=object)
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    # rank of each dictionary entry in string order, so groups come out sorted by item_id
    rank = np.empty(len(dictionary), np.int64)
    rank[np.argsort(dictionary.astype(str), kind="stable")] = np.arange(len(dictionary))
    cams = np.asarray(camera_ids, dtype=np.int64)
    order = np.lexsort((cams, rank[codes]))
    key_item, key_cam = rank[codes][order], cams[order]
    boundary = np.ones(len(order), bool)
    boundary[1:] = (key_item[1:] != key_item[:-1]) | (key_cam[1:] != key_cam[:-1])
    starts = np.flatnonzero(boundary)
    return order, starts, order[starts]


def segment_sums(x: np.ndarray, starts: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Sums of consecutive row segments of x[order] (or x) starting at `starts`, in float64.

    x: (N, D) float; starts: (G,) sorted segment starts (starts[0] == 0). Returns (G, D) float64.
    One-row segments are copied in one vectorised step; longer ones are summed with np.sum per
    segment: both several times faster than np.add.reduceat along axis 0, which walks the
    matrix row by row with a float64 cast per element.
    """
    n = len(order) if order is not None else len(x)
    sizes = np.diff(np.append(starts, n))
    rows = order if order is not None else np.arange(n)
    single = sizes == 1
    if single.all():  # nothing to add up (e.g. a combine whose pairs met no duplicate): one gather
        return np.take(x, rows[starts], axis=0).astype(np.float64, copy=False)
    out = np.empty((len(starts), x.shape[1]), np.float64)
    out[single] = x[rows[starts[single]]]
    for g in np.flatnonzero(~single):
        a = starts[g]
        seg = x[rows[a:a + sizes[g]]] if order is not None else x[a:a + sizes[g]]
        np.sum(seg, axis=0, dtype=np.float64, out=out[g])
    return out


def _check_inputs(item_ids, camera_ids, vectors: np.ndarray, counts=None) -> None:
    if vectors.ndim != 2:
        raise VectorFileError(f"expected (N, D) vectors, got shape {vectors.shape}")
    n = len(vectors)
    if len(item_ids) != n or len(camera_ids) != n or (counts is not None and len(counts) != n):
        raise VectorFileError("item_ids, camera_ids and vectors differ in length")
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors)).any(axis=1).sum())
        raise VectorFileError(f"{bad} vector(s) contain NaN or inf")
    if any(i is None for i in item_ids):
        raise VectorFileError("item_id has null values")


def camera_codes(camera_ids, n: int) -> np.ndarray:
    """camera ids with None/NaN/null for unknown (or None for a whole batch) -> (n,) int64."""
    if camera_ids is None:
        return np.full(n, UNKNOWN_CAMERA, np.int64)
    if isinstance(camera_ids, (pa.Array, pa.ChunkedArray)):
        return np.asarray(camera_ids.fill_null(UNKNOWN_CAMERA).to_numpy(zero_copy_only=False), np.int64)
    arr = np.asarray(camera_ids, dtype=object)
    return np.array([UNKNOWN_CAMERA if c is None or (isinstance(c, float) and np.isnan(c)) else int(c) for c in arr], dtype=np.int64) \
        if arr.dtype == object else np.asarray(camera_ids, np.int64)


def partial_sums(item_ids, camera_ids, vectors: np.ndarray, counts=None) -> PairSums:
    """Sum a batch of vectors per (item, camera) pair.

    item_ids: (N,) str; camera_ids: (N,) int (UNKNOWN_CAMERA = unknown) or None (all unknown);
    vectors: (N, D) float32 or float64 (image embeddings, or already-summed rows when `counts`
    gives how many images each row stands for). Returns PairSums sorted by (item, camera).
    """
    vectors = np.asarray(vectors)
    item_ids = np.asarray(item_ids, dtype=object)
    cams = camera_codes(camera_ids, len(item_ids))
    _check_inputs(item_ids, cams, vectors, counts)
    if len(vectors) == 0:
        return empty_pair_sums(vectors.shape[1])
    order, starts, first = _encode_pairs(item_ids, cams)
    sums = segment_sums(vectors, starts, order)
    if counts is None:
        n = np.diff(np.append(starts, len(order)))
    else:
        n = np.add.reduceat(np.asarray(counts, np.int64)[order], starts)
    return PairSums(item_ids[first], cams[first], sums, n.astype(np.int64))


def combine(parts: Iterable[PairSums], drop_empty: bool = True) -> PairSums:
    """Merge partial pair sums (from any batches, in any order) into one PairSums.
    drop_empty: remove pairs whose count is 0 (after ``apply_delta`` subtractions)."""
    parts = [p for p in parts]
    if not parts:
        raise VectorFileError("nothing to combine")
    dims = {p.dim for p in parts}
    if len(dims) != 1:
        raise VectorFileError(f"partial sums differ in dimension: {sorted(dims)}")
    parts = [p for p in parts if len(p)] or parts[:1]
    if not len(parts[0]):
        merged = parts[0]
    else:  # always regroup: one part may hold several rows of a pair (concatenated partials)
        def cat(name):  # no copy for a single part
            arrays = [getattr(p, name) for p in parts]
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

        merged = partial_sums(cat("item_ids"), cat("camera_ids"), cat("sums"), counts=cat("counts"))
    if drop_empty:
        if (merged.counts < 0).any():
            raise VectorFileError("negative image count after combining (removed more than was added)")
        merged = merged.take(np.flatnonzero(merged.counts > 0))
    return merged


def negate(p: PairSums) -> PairSums:
    return PairSums(p.item_ids, p.camera_ids, -p.sums, -p.counts)


def apply_delta(current: PairSums, added: PairSums | None = None, removed: PairSums | None = None
                ) -> tuple[PairSums, np.ndarray]:
    """Nightly update: current + added - removed. Returns (new pair sums, touched item ids).
    Only the touched items need their centroids re-finalised (``finalize(new, items=touched)``)."""
    parts = [current]
    touched = []
    if added is not None:
        parts.append(added)
        touched.append(added.item_ids)
    if removed is not None:
        parts.append(negate(removed))
        touched.append(removed.item_ids)
    items = np.unique(np.concatenate(touched).astype(str)) if touched else np.empty(0, str)
    return combine(parts), items.astype(object)


def finalize(p: PairSums, items: Iterable[str] | None = None) -> Centroids:
    """Pair sums -> centroids: per item the sum over its pairs, divided by its count, then
    L2-normalised. items: restrict to these item ids (touched items), else all.
    Raises VectorFileError for an item with no image (count 0)."""
    if items is not None:
        wanted = np.asarray(list(items), dtype=object).astype(str)
        p = p.take(np.flatnonzero(np.isin(p.item_ids.astype(str), wanted)))
    if len(p) == 0:
        return Centroids(np.empty(0, object), np.zeros((0, p.dim), np.float32), np.empty(0, np.int32),
                         [], np.zeros((0, p.dim)))
    # pairs are sorted by item, so an item's pairs are one contiguous run
    ids = p.item_ids.astype(str)
    boundary = np.ones(len(ids), bool)
    boundary[1:] = ids[1:] != ids[:-1]
    starts = np.flatnonzero(boundary)
    sums = segment_sums(p.sums, starts)
    counts = np.add.reduceat(p.counts, starts)
    if (counts <= 0).any():
        bad = p.item_ids[starts[np.flatnonzero(counts <= 0)[0]]]
        raise VectorFileError(f"item {bad!r} has no image (count {int(counts[counts <= 0][0])})")
    means = sums / counts[:, None]
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        bad = p.item_ids[starts[np.flatnonzero(norms[:, 0] < 1e-12)[0]]]
        raise VectorFileError(f"item {bad!r}: its embeddings sum to zero, no direction to normalise")
    embeddings = (means / norms).astype(np.float32)
    cams = np.split(p.camera_ids, starts[1:])
    camera_lists = [[int(c) for c in cs if c != UNKNOWN_CAMERA] for cs in cams]
    return Centroids(p.item_ids[starts], embeddings, counts.astype(np.int32), camera_lists, sums)


def centroids_reference(item_ids, camera_ids, vectors: np.ndarray) -> Centroids:
    """Plain numpy reference (np.unique + np.add.at, one pass), for tests and benchmarks."""
    item_ids = np.asarray(item_ids).astype(str)
    items, inv = np.unique(item_ids, return_inverse=True)
    sums = np.zeros((len(items), vectors.shape[1]))
    np.add.at(sums, inv, vectors)
    counts = np.bincount(inv, minlength=len(items))
    means = sums / counts[:, None]
    emb = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
    cams = camera_codes(camera_ids, len(item_ids))
    camera_lists = [sorted({int(c) for c in cams[inv == i] if c != UNKNOWN_CAMERA}) for i in range(len(items))]
    return Centroids(items.astype(object), emb, counts.astype(np.int32), camera_lists, sums)


# ---- Parquet form of pair sums: OUT/item_camera_sums.parquet --------------------------------

SUMS_DTYPES = {"float32": pa.float32(), "float64": pa.float64()}


def sums_schema(dim: int, model: str, dtype: str = "float64") -> pa.Schema:
    """item_camera_sums: one row per (item, camera) pair. `sum` is the sum of the pair's
    L2-normalised image embeddings (accumulated in float64, stored as `dtype`), `count` the
    number of images; camera_id null = unknown."""
    meta = json.dumps({"model": str(model), "dim": int(dim), "normalized": False, "kind": SUMS_KIND})
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("camera_id", pa.int32()),
            pa.field("sum", pa.list_(SUMS_DTYPES[dtype], dim), nullable=False),
            pa.field("count", pa.int32(), nullable=False),
        ],
        metadata={META_KEY: meta.encode()},
    )


def pair_sums_to_table(p: PairSums, model: str, dtype: str = "float64") -> pa.Table:
    cams = pa.array(p.camera_ids.astype(np.int32), pa.int32(), mask=p.camera_ids == UNKNOWN_CAMERA)
    sums = _fixed_list(p.sums.astype(dtype, copy=False), SUMS_DTYPES[dtype])
    return pa.table([pa.array(p.item_ids, pa.string()), cams, sums,
                     pa.array(p.counts.astype(np.int32), pa.int32())], schema=sums_schema(p.dim, model, dtype))


def pair_sums_from_table(table: pa.Table | pa.RecordBatch, where: str = "item_camera_sums") -> PairSums:
    """Inverse of pair_sums_to_table (also reads float32 sums)."""
    missing = [c for c in ("item_id", "camera_id", "sum", "count") if c not in table.schema.names]
    if missing:
        raise VectorFileError(f"{where}: not an item_camera_sums file, missing column(s) {', '.join(missing)}")
    col = table.column("sum")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not pa.types.is_fixed_size_list(col.type):
        raise VectorFileError(f"{where}: sum column is {col.type}, expected fixed_size_list<float64>[D]")
    sums = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64, copy=False).reshape(-1, col.type.list_size)
    return PairSums(np.asarray(table.column("item_id").to_pylist(), dtype=object),
                    camera_codes(table.column("camera_id"), table.num_rows),
                    sums, np.asarray(table.column("count").to_numpy(zero_copy_only=False), np.int64))


def read_pair_sums(path: str) -> tuple[PairSums, str]:
    """Read OUT/item_camera_sums.parquet whole -> (PairSums, model id)."""
    import pyarrow.parquet as pq

    from contracts.storage import resolve

    fs, p = resolve(path)
    table = pq.read_table(p, filesystem=fs)
    raw = (table.schema.metadata or {}).get(META_KEY)
    model = json.loads(raw)["model"] if raw else ""
    return combine([pair_sums_from_table(table, path)]), model


# ---- Arrow batch functions for the distributed job (pipelines/centroids.py) -------------------
# Stage 1 (per input batch): embeddings rows -> partial pair-sum rows with a hash bucket.
# Stage 2 (per bucket, after a shuffle on `bucket`): partial rows -> one row per item, holding
#   its centroid and its pairs (nested lists), so an item is never split between two batches.
# Stage 3 (driver, streaming): item rows -> centroids rows + item_camera_sums rows.

def bucket_of(item_ids: np.ndarray, buckets: int) -> np.ndarray:
    """(N,) int32 bucket of each item id: a stable hash (crc32), the same on every node."""
    import zlib

    enc = pc.dictionary_encode(pa.array(np.asarray(item_ids, dtype=object), pa.string()))
    uniq = enc.dictionary.to_pylist()
    per = np.array([zlib.crc32(u.encode()) % buckets for u in uniq], dtype=np.int32)
    return per[enc.indices.to_numpy(zero_copy_only=False)] if len(uniq) else np.empty(0, np.int32)


def _fixed_list(x: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1), value_type), x.shape[1])


def _vectors(col, dtype=np.float32) -> np.ndarray:
    """fixed_size_list column -> (N, D) array of `dtype` (None: keep the stored type, no copy)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not pa.types.is_fixed_size_list(col.type):
        raise VectorFileError(f"embedding column is {col.type}, expected fixed_size_list<float32>[D]")
    if col.null_count:
        raise VectorFileError(f"{col.null_count} null embedding(s)")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return (values if dtype is None else values.astype(dtype, copy=False)).reshape(-1, col.type.list_size)


def partial_table(batch: pa.Table, buckets: int, dtype: str = "float64", normalized: bool = True) -> pa.Table:
    """Embeddings batch (item_id, camera_id?, embedding) -> partial pair sums as Arrow:
    bucket int32, item_id, camera_id int32 (null = unknown), sum fixed_size_list<dtype>[D]
    (summed in float64, then stored as `dtype`: float32 halves what the shuffle moves), count
    int64. Raises VectorFileError on NaN/inf, null or empty item ids, and (normalized=True, the
    embeddings contract) on rows that are not L2-normalised."""
    items = batch.column("item_id")
    if items.null_count or (len(items) and pc.any(pc.equal(items, "")).as_py()):
        raise VectorFileError("embeddings have a row with an empty item_id")
    x = _vectors(batch.column("embedding"))
    check_vectors(x, normalized=normalized, what="embeddings")
    cams = batch.column("camera_id") if "camera_id" in batch.schema.names else None
    p = partial_sums(np.asarray(items.to_pylist(), dtype=object), camera_codes(cams, batch.num_rows), x)
    return pa.table({
        "bucket": pa.array(bucket_of(p.item_ids, buckets), pa.int32()),
        "item_id": pa.array(p.item_ids, pa.string()),
        "camera_id": pa.array(p.camera_ids.astype(np.int32), pa.int32(), mask=p.camera_ids == UNKNOWN_CAMERA),
        "sum": _fixed_list(p.sums.astype(dtype, copy=False), SUMS_DTYPES[dtype]),
        "count": pa.array(p.counts, pa.int64()),
    })


def pair_sums_of_partial(table: pa.Table) -> PairSums:
    return PairSums(np.asarray(table.column("item_id").to_pylist(), dtype=object),
                    camera_codes(table.column("camera_id"), table.num_rows),
                    _vectors(table.column("sum"), None),
                    np.asarray(table.column("count").to_numpy(zero_copy_only=False), np.int64))


def item_rows_schema(dim: int, dtype: str = "float64") -> pa.Schema:
    return pa.schema([
        pa.field("item_id", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
        pa.field("count", pa.int32()),
        pa.field("camera_ids", pa.list_(pa.int32())),
        pa.field("pair_camera_ids", pa.list_(pa.int32())),
        pa.field("pair_sums", pa.list_(pa.list_(SUMS_DTYPES[dtype], dim))),
        pa.field("pair_counts", pa.list_(pa.int32())),
    ])


def combine_table(table: pa.Table, dtype: str = "float64") -> pa.Table:
    """All partial rows of some items (one bucket) -> one row per item (item_rows_schema):
    centroid, count, camera_ids, and the item's (camera, sum, count) pairs as nested lists."""
    dim = table.schema.field("sum").type.list_size
    if table.num_rows == 0:
        return item_rows_schema(dim, dtype).empty_table()
    p = combine([pair_sums_of_partial(table)])
    c = finalize(p)
    ids = p.item_ids.astype(str)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]).astype(np.int32)
    offsets = pa.array(np.r_[starts, len(p)].astype(np.int32))
    cams = pa.array(p.camera_ids.astype(np.int32), pa.int32(), mask=p.camera_ids == UNKNOWN_CAMERA)
    return pa.Table.from_arrays([
        pa.array(c.item_ids, pa.string()),
        _fixed_list(c.embeddings, pa.float32()),
        pa.array(c.counts, pa.int32()),
        pa.array(c.camera_ids, pa.list_(pa.int32())),
        pa.ListArray.from_arrays(offsets, cams),
        pa.ListArray.from_arrays(offsets, _fixed_list(p.sums.astype(dtype, copy=False), SUMS_DTYPES[dtype])),
        pa.ListArray.from_arrays(offsets, pa.array(p.counts.astype(np.int32), pa.int32())),
    ], schema=item_rows_schema(dim, dtype))


def _dtype_name(t: pa.DataType) -> str:
    return next(name for name, typ in SUMS_DTYPES.items() if typ == t)


def split_item_rows(table: pa.Table, model: str) -> tuple[pa.Table, pa.Table]:
    """Item rows -> (centroids-contract table, item_camera_sums table), both with metadata."""
    from contracts.vectors import centroids_schema

    dim = table.schema.field("embedding").type.list_size
    cents = table.select(["item_id", "embedding", "count", "camera_ids"]).cast(centroids_schema(dim, model))
    parents = pc.list_parent_indices(table.column("pair_counts"))
    sums = pa.table({
        "item_id": table.column("item_id").take(parents),
        "camera_id": pc.list_flatten(table.column("pair_camera_ids")),
        "sum": pc.list_flatten(table.column("pair_sums")),
        "count": pc.list_flatten(table.column("pair_counts")),
    }).cast(sums_schema(dim, model, _dtype_name(table.schema.field("pair_sums").type.value_type.value_type)))
    return cents, sums


def to_item_sums(p: PairSums, vocabulary: np.ndarray):
    """PairSums (e.g. from read_pair_sums) -> index.evaluation.metrics.ItemSums over the integer item codes of
    `vocabulary` (LabelCodes.vocabulary: sorted item ids of queries + gallery), for centroid-mode
    evaluation with camera exclusion (metrics.evaluate_centroids). Every item of `p` must be in
    the vocabulary."""
    from index.evaluation.metrics import ItemSums

    vocab = np.asarray(vocabulary).astype(str)
    ids = p.item_ids.astype(str)
    codes = np.searchsorted(vocab, ids)
    if len(ids) and (codes.max() >= len(vocab) or (vocab[np.minimum(codes, len(vocab) - 1)] != ids).any()):
        raise VectorFileError("item_camera_sums holds items missing from the label vocabulary")
    c = finalize(p)
    item_codes = np.searchsorted(vocab, c.item_ids.astype(str))
    # like metrics.item_sums: every (item, camera) pair, none when no camera is known at all
    known = np.full(len(p), bool((p.camera_ids != UNKNOWN_CAMERA).any()))
    return ItemSums(item_codes.astype(np.int64), c.sums, c.counts.astype(np.int64),
                    codes[known].astype(np.int64), p.camera_ids[known].astype(np.int64),
                    p.sums[known], p.counts[known].astype(np.int64))
