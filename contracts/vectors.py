"""Parquet contracts for vectors: embeddings (one row per image) and centroids (one per item).

Both carry an ``embedding`` column of ``fixed_size_list<float32>[D]`` and schema metadata under
the key ``centroid_retrieval``: ``{"model": ..., "dim": D, "normalized": true}``
(see DESIGN.md, "Contracts"). This module is the one place that builds, validates and reads them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from contracts.storage import atomic_path, resolve

__all__ = [
    "META_KEY",
    "NORM_TOLERANCE",
    "REQUIRED",
    "STREAM_BUFFER",
    "UNKNOWN_CAMERA",
    "VectorFileError",
    "VectorMeta",
    "VectorTable",
    "arrow_to_embeddings",
    "camera_array",
    "centroids_schema",
    "check_files_agree",
    "check_schema",
    "check_unique_file",
    "check_unique_ids",
    "check_vectors",
    "detect_kind",
    "embedding_type",
    "embeddings_schema",
    "embeddings_to_arrow",
    "id_column",
    "iter_vector_batches",
    "l2_normalize",
    "make_centroids_table",
    "make_embeddings_table",
    "open_dataset",
    "read_metadata",
    "read_vectors",
    "vector_metadata",
    "write_table_atomic",
]

META_KEY = b"centroid_retrieval"
NORM_TOLERANCE = 1e-3


class VectorFileError(ValueError):
    """Bad vector input: wrong schema, wrong dimension, NaN/inf, missing metadata."""


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def embeddings_schema(dim: int, model: str) -> pa.Schema:
    """Schema of the embeddings contract (one row per image)."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("camera_id", pa.int32()),
            pa.field("split", pa.string()),
            pa.field("embedding", embedding_type(dim), nullable=False),
        ],
        metadata={META_KEY: vector_metadata(model, dim)},
    )


def centroids_schema(dim: int, model: str) -> pa.Schema:
    """Schema of the centroids contract (one row per item)."""
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("embedding", embedding_type(dim), nullable=False),
            pa.field("count", pa.int32(), nullable=False),
            pa.field("camera_ids", pa.list_(pa.int32())),
        ],
        metadata={META_KEY: vector_metadata(model, dim)},
    )


def vector_metadata(model: str, dim: int) -> bytes:
    return json.dumps({"model": str(model), "dim": int(dim), "normalized": True}).encode()


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation. x: (N, D) float -> (N, D) float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def check_vectors(x: np.ndarray, dim: int | None = None, normalized: bool = True, what: str = "vectors") -> None:
    """Raise VectorFileError on a wrong shape/dimension, NaN/inf, or (if asked) non-unit rows."""
    if x.ndim != 2:
        raise VectorFileError(f"{what}: expected a 2-D array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise VectorFileError(f"{what}: dimension {x.shape[1]} does not match expected {dim}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise VectorFileError(f"{what}: {bad} row(s) contain NaN or inf")
    if normalized and len(x):
        norms = np.linalg.norm(x, axis=1)
        if np.abs(norms - 1).max() > NORM_TOLERANCE:
            raise VectorFileError(f"{what}: rows are not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f})")


def embeddings_to_arrow(x: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 -> fixed_size_list<float32>[D] array (no copy when contiguous)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def arrow_to_embeddings(col: pa.Array | pa.ChunkedArray, what: str = "embedding") -> np.ndarray:
    """fixed_size_list<float32>[D] column -> (N, D) float32 numpy array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not pa.types.is_fixed_size_list(col.type):
        raise VectorFileError(f"{what}: expected fixed_size_list<float32>[D], got {col.type}")
    dim = col.type.list_size
    if col.null_count:
        raise VectorFileError(f"{what}: {col.null_count} null embedding(s)")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dim)


def make_embeddings_table(
    image_ids, item_ids, camera_ids, splits, embeddings: np.ndarray, model: str
) -> pa.Table:
    """Build an embeddings-contract table. embeddings: (N, D) float32, L2-normalised."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    check_vectors(embeddings, what="embeddings")
    schema = embeddings_schema(embeddings.shape[1], model)
    return pa.table(
        [
            pa.array(image_ids, pa.string()),
            pa.array(item_ids, pa.string()),
            pa.array(camera_ids, pa.int32()),
            pa.array(splits, pa.string()),
            embeddings_to_arrow(embeddings),
        ],
        schema=schema,
    )


def make_centroids_table(item_ids, embeddings: np.ndarray, counts, camera_ids, model: str) -> pa.Table:
    """Build a centroids-contract table. embeddings: (I, D) float32 L2-normalised means;
    counts: (I,) images per item; camera_ids: per item a list of int camera ids."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    check_vectors(embeddings, what="centroids")
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if len(counts) and counts.min() < 1:  # a centroid of no images is not a vector of that item
        bad = list(item_ids)[int(np.argmin(counts))]
        raise VectorFileError(f"centroids: item {bad!r} has {int(counts.min())} images (every item needs >= 1)")
    schema = centroids_schema(embeddings.shape[1], model)
    return pa.table(
        [
            pa.array(item_ids, pa.string()),
            embeddings_to_arrow(embeddings),
            pa.array(np.asarray(counts, dtype=np.int32), pa.int32()),
            pa.array(camera_ids, pa.list_(pa.int32())),
        ],
        schema=schema,
    )


def write_table_atomic(table: pa.Table, path: str) -> None:
    """Write one Parquet file under a temporary name, then rename into place."""
    with atomic_path(path) as (fs, tmp):
        pq.write_table(table, tmp, filesystem=fs)


@dataclass(frozen=True)
class VectorMeta:
    model: str
    dim: int
    normalized: bool


def read_metadata(schema: pa.Schema, where: str) -> VectorMeta:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise VectorFileError(f"{where}: missing '{META_KEY.decode()}' schema metadata (not an embeddings/centroids file)")
    try:
        meta = json.loads(raw)
        return VectorMeta(model=str(meta["model"]), dim=int(meta["dim"]), normalized=bool(meta.get("normalized", True)))
    except (ValueError, KeyError, TypeError) as e:
        raise VectorFileError(f"{where}: unreadable '{META_KEY.decode()}' metadata: {e}") from None


def open_dataset(path: str) -> pads.Dataset:
    """A Parquet file or a directory of them (local or any pyarrow filesystem URI)."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pa.fs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {path}")
    try:
        return pads.dataset(p, filesystem=fs, format="parquet", exclude_invalid_files=False,
                            ignore_prefixes=[".", "_", "tmp"])
    except (pa.ArrowInvalid, OSError) as e:
        raise VectorFileError(f"{path}: not readable as Parquet: {str(e).splitlines()[0]}") from None


REQUIRED = {
    "embeddings": ("image_id", "item_id", "embedding"),
    "centroids": ("item_id", "embedding"),
}


def check_schema(schema: pa.Schema, kind: str, where: str) -> VectorMeta:
    missing = [c for c in REQUIRED[kind] if c not in schema.names]
    if missing:
        raise VectorFileError(f"{where}: not a {kind} file, missing column(s) {', '.join(missing)}")
    meta = read_metadata(schema, where)
    col = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(col) or col.list_size != meta.dim:
        raise VectorFileError(f"{where}: embedding column {col} does not match metadata dim {meta.dim}")
    return meta


def check_files_agree(ds: pads.Dataset, where: str) -> None:
    """Every file of a multi-file dataset must have the embedding type and model of the first:
    the dataset's schema is the first file's, so a file of another dimension would otherwise fail
    deep in Arrow and a file of another model would be read as the first file's model. Reads one
    Parquet footer per file."""
    files = getattr(ds, "files", None) or []
    if len(files) < 2:
        return
    first = None
    for frag in ds.get_fragments():
        s = frag.physical_schema
        emb = s.field("embedding").type if "embedding" in s.names else None
        try:
            meta = json.loads((s.metadata or {}).get(META_KEY, b"null")) or {}
        except ValueError:
            meta = {}
        key = (str(emb), meta.get("model"), meta.get("dim"))
        if first is None:
            first = (frag.path, key)
        elif key != first[1]:
            raise VectorFileError(
                f"{where}: files disagree: {os.path.basename(frag.path)} has embedding {key[0]} of model "
                f"{key[1]} (dim {key[2]}), {os.path.basename(first[0])} has {first[1][0]} of model "
                f"{first[1][1]} (dim {first[1][2]})")


def detect_kind(schema: pa.Schema) -> str:
    return "embeddings" if "image_id" in schema.names else "centroids"


@dataclass
class VectorTable:
    """Vectors and their labels, loaded whole (for query sets and galleries that fit RAM).

    vectors: (N, D) float32; item_ids: (N,) object; image_ids: (N,) object or None (centroids);
    camera_ids: (N,) int64 with -1 for unknown, or None when the file has no camera column.
    """

    vectors: np.ndarray
    item_ids: np.ndarray
    image_ids: np.ndarray | None
    camera_ids: np.ndarray | None
    meta: VectorMeta
    kind: str
    table: pa.Table  # labels only (no embedding column), for callers that need other columns

    def __len__(self) -> int:
        return len(self.vectors)


UNKNOWN_CAMERA = -1


def camera_array(col: pa.ChunkedArray | None) -> np.ndarray | None:
    """camera_id column -> int64 array with UNKNOWN_CAMERA for nulls; None if all unknown."""
    if col is None or col.null_count == len(col):
        return None
    return np.asarray(col.fill_null(UNKNOWN_CAMERA).to_numpy(), dtype=np.int64)


def read_vectors(path: str, kind: str | None = None, split: str | None = None,
                 expect_dim: int | None = None) -> VectorTable:
    """Read an embeddings or centroids Parquet file/dir whole, validating the contract.

    split: keep only rows of that split (embeddings only).
    """
    ds = open_dataset(path)
    kind = kind or detect_kind(ds.schema)
    meta = check_schema(ds.schema, kind, path)
    check_files_agree(ds, path)
    flt = None
    if split is not None and "split" in ds.schema.names:
        flt = pads.field("split") == split
    table = ds.to_table(filter=flt)
    check_unique_ids(table.column(id_column(kind)), path, id_column(kind))
    vectors = arrow_to_embeddings(table.column("embedding"), what=f"{path}: embedding")
    check_vectors(vectors, dim=expect_dim or meta.dim, normalized=meta.normalized, what=path)
    labels = table.drop_columns(["embedding"])
    if labels.column("item_id").null_count:
        raise VectorFileError(f"{path}: item_id has null values")
    item_ids = np.asarray(labels.column("item_id").to_pylist(), dtype=object)
    image_ids = (np.asarray(labels.column("image_id").to_pylist(), dtype=object)
                 if "image_id" in labels.column_names else None)
    cams = camera_array(labels.column("camera_id")) if "camera_id" in labels.column_names else None
    return VectorTable(vectors, item_ids, image_ids, cams, meta, kind, labels)


def id_column(kind: str) -> str:
    """The column that must be unique: image_id for embeddings, item_id for centroids."""
    return "image_id" if kind == "embeddings" else "item_id"


def check_unique_ids(ids: pa.Array | pa.ChunkedArray, where: str, name: str = "image_id") -> None:
    """Raise VectorFileError naming the first id that occurs more than once, and how often
    (e.g. two copies of a shard: every image twice). Arrow hashing: ~tens of MB for 10^6 ids."""
    import pyarrow.compute as pc

    if len(ids) == pc.count_distinct(ids, mode="all").as_py():
        return
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    first, n = dup[0]["values"].as_py(), dup[0]["counts"].as_py()
    raise VectorFileError(f"{where}: {name} {first!r} appears {n} times ({len(dup)} duplicated "
                          f"{name}(s)): each {'image' if name == 'image_id' else 'item'} must be one row")


def check_unique_file(path: str, kind: str | None = None) -> None:
    """check_unique_ids over a whole Parquet file/dir, reading only its id column."""
    ds = open_dataset(path)
    kind = kind or detect_kind(ds.schema)
    col = id_column(kind)
    check_unique_ids(ds.to_table(columns=[col]).column(col), path, col)


# Readers stream files with pyarrow.parquet.ParquetFile.iter_batches without pre-buffering:
# the dataset scanner reads whole row groups ahead (a 200,000-row file written as one row group
# took 1.7 GB to stream in 4,096-row batches), so memory followed the file, not the batch.
STREAM_BUFFER = 1 << 20


def iter_vector_batches(path: str, batch_size: int = 65536, columns: list[str] | None = None
                        ) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Stream (labels batch, (n, D) float32 vectors) from a Parquet file/dir, never loading it
    whole: memory follows `batch_size`, not the file or its row groups. Files in dataset order."""
    ds = open_dataset(path)
    meta = check_schema(ds.schema, detect_kind(ds.schema), path)
    check_files_agree(ds, path)
    cols = list(dict.fromkeys([*(ds.schema.names if columns is None else columns), "embedding"]))
    for batch in _stream_batches(ds, cols, batch_size):
        if batch.num_rows == 0:
            continue
        vecs = arrow_to_embeddings(batch.column("embedding"), what=f"{path}: embedding")
        check_vectors(vecs, dim=meta.dim, normalized=meta.normalized, what=path)
        yield batch.drop_columns(["embedding"]) if hasattr(batch, "drop_columns") else batch, vecs


def _stream_batches(ds: pads.Dataset, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    for frag in ds.get_fragments():
        with ds.filesystem.open_input_file(frag.path) as f:
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=STREAM_BUFFER)
            have = [c for c in columns if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=batch_size, columns=have)
