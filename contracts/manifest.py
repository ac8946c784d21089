"""The manifest contract: one row per image (DESIGN.md, "Contracts / Manifest").

| column    | type            | meaning                                                    |
|-----------|-----------------|------------------------------------------------------------|
| image_id  | string, unique  | stable id: the path relative to the dataset root           |
| item_id   | string          | identity / product id; "-1" junk, "0" distractor           |
| camera_id | int32, nullable | camera or domain; null when unknown                        |
| split     | string          | train, query or gallery                                    |
| path      | string          | image path relative to the dataset root                    |

This module is the one place that builds, validates, writes and reads manifests. Rows are
always kept sorted by image_id so that the same input gives a byte-identical file.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.storage import atomic_path

__all__ = [
    "COLUMNS",
    "DISTRACTOR_ITEM",
    "JUNK_ITEM",
    "MANIFEST_SCHEMA",
    "REJECTED_SCHEMA",
    "SPLITS",
    "ManifestError",
    "items_of",
    "make_manifest_table",
    "make_rejected_table",
    "manifest_to_bytes",
    "read_manifest",
    "row_dicts",
    "row_problem",
    "split_counts",
    "validate_manifest",
    "write_manifest",
]

SPLITS = ("train", "query", "gallery")
COLUMNS = ("image_id", "item_id", "camera_id", "split", "path")
JUNK_ITEM = "-1"
DISTRACTOR_ITEM = "0"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("camera_id", pa.int32()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [pa.field("path", pa.string(), nullable=False), pa.field("reason", pa.string(), nullable=False)]
)


class ManifestError(ValueError):
    """A manifest that breaks the contract: missing column, wrong type, duplicate id, bad split."""


def row_problem(row: object) -> str | None:
    """Why one manifest row (a dict, e.g. a shard sample's JSON) breaks the contract, or None.

    image_id and item_id non-empty strings, camera_id an int32 or null, split one of SPLITS,
    path (when present) a non-empty string. Checked per row so a reader can turn just that row
    into an error instead of failing on the whole batch.
    """
    if not isinstance(row, Mapping):
        return f"manifest row is a {type(row).__name__}, not an object"
    for name in ("image_id", "item_id"):
        v = row.get(name)
        if not isinstance(v, str) or not v:
            return f"{name} {'missing' if name not in row else repr(v)}: not a non-empty string"
    cam = row.get("camera_id")
    if cam is not None and (not isinstance(cam, int) or isinstance(cam, bool)
                            or not -2**31 <= cam < 2**31):
        return f"camera_id {cam!r} is not an int32 integer or null"
    if row.get("split") not in SPLITS:
        return f"split {row.get('split')!r} is not one of {', '.join(SPLITS)}"
    if "path" in row and (not isinstance(row["path"], str) or not row["path"]):
        return f"path {row['path']!r} is not a non-empty string"
    return None


def make_manifest_table(rows: Iterable[Mapping]) -> pa.Table:
    """Rows (dicts with the five contract keys) -> validated manifest table sorted by image_id.

    camera_id may be None (unknown); item_id is converted with str().
    """
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for r in rows:
        cols["image_id"].append(r["image_id"])
        cols["item_id"].append(None if r["item_id"] is None else str(r["item_id"]))
        cam = r.get("camera_id")
        cols["camera_id"].append(None if cam is None else int(cam))
        cols["split"].append(r["split"])
        cols["path"].append(r["path"])
    arrays = [pa.array(cols[f.name], type=f.type) for f in MANIFEST_SCHEMA]
    # Build with all fields nullable so that a None in a required column is reported by
    # validate_manifest as a ManifestError rather than by Arrow.
    table = pa.Table.from_arrays(arrays, schema=_nullable_schema())
    return validate_manifest(table)


def _nullable_schema() -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in MANIFEST_SCHEMA])


def validate_manifest(table: pa.Table, source: str = "manifest") -> pa.Table:
    """Check the contract and return the table with the exact schema, sorted by image_id.

    Raises ManifestError naming the first problem found.
    """
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{source}: missing column(s) {', '.join(missing)}")
    table = table.select(list(COLUMNS))
    cast = []
    for f in MANIFEST_SCHEMA:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            ok = (pa.types.is_integer(col.type) and pa.types.is_integer(f.type)) or (
                pa.types.is_string(f.type) and (pa.types.is_large_string(col.type)
                                                or pa.types.is_dictionary(col.type)
                                                or pa.types.is_null(col.type)))
            if f.name == "camera_id" and pa.types.is_null(col.type):
                ok = True
            if not ok:
                raise ManifestError(f"{source}: column {f.name} has type {col.type}, expected {f.type}")
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ManifestError(f"{source}: column {f.name} cannot be cast to {f.type}: {e}") from e
        if not f.nullable and col.null_count:
            raise ManifestError(f"{source}: column {f.name} has {col.null_count} null value(s)")
        cast.append(col)
    table = pa.Table.from_arrays(cast, schema=MANIFEST_SCHEMA)
    if table.num_rows:
        bad = pc.invert(pc.is_in(table.column("split"), value_set=pa.array(SPLITS)))
        if pc.any(bad).as_py():
            value = table.column("split").filter(bad)[0].as_py()
            raise ManifestError(f"{source}: split {value!r} is not one of {', '.join(SPLITS)}")
        for name in ("image_id", "item_id", "path"):
            if pc.any(pc.equal(pc.utf8_length(table.column(name)), 0)).as_py():
                raise ManifestError(f"{source}: column {name} has an empty string")
        counts = pc.value_counts(table.column("image_id"))
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(dup):
            raise ManifestError(f"{source}: image_id {dup[0]['values'].as_py()!r} is not unique")
    return table.sort_by("image_id")


def write_manifest(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a (validated) manifest to Parquet at `path` (local or a pyarrow URI).

    Deterministic: same rows -> same bytes (sorted by image_id, no timestamps in the file).
    Written to a temporary name beside it and renamed into place (contracts.storage.atomic_path),
    so a reader never sees a half-written manifest.
    """
    table = validate_manifest(table)
    with atomic_path(os.fspath(path)) as (fs, tmp):
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read and validate a manifest Parquet file -> pa.Table with MANIFEST_SCHEMA.

    Raises FileNotFoundError when absent, ManifestError when it breaks the contract.
    """
    path = os.fspath(path)
    if "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{path}: not a readable Parquet file: {e}") from e
    return validate_manifest(table, source=path)


def manifest_to_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes write_manifest would write (used to compare runs)."""
    buf = io.BytesIO()
    pq.write_table(validate_manifest(table), buf, compression="zstd")
    return buf.getvalue()


def make_rejected_table(rejected: Iterable[tuple[str, str]]) -> pa.Table:
    """(path, reason) pairs -> rejected table sorted by path."""
    pairs = sorted(rejected)
    return pa.table(
        {"path": pa.array([p for p, _ in pairs], pa.string()),
         "reason": pa.array([r for _, r in pairs], pa.string())},
        schema=REJECTED_SCHEMA,
    )


def split_counts(table: pa.Table) -> dict[str, int]:
    """Rows per split, in SPLITS order (0 for absent splits)."""
    counts = {s: 0 for s in SPLITS}
    for v in pc.value_counts(table.column("split")).to_pylist():
        counts[v["values"]] = v["counts"]
    return counts


def items_of(table: pa.Table, split: str) -> set[str]:
    """Distinct item ids of one split."""
    mask = pc.equal(table.column("split"), split)
    return set(pc.unique(table.column("item_id").filter(mask)).to_pylist())


def row_dicts(table: pa.Table) -> list[dict]:
    """Manifest rows as plain dicts (small tables; use batches for big ones)."""
    return table.select(list(COLUMNS)).to_pylist()
