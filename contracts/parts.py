"""The embed output layout, shared by the embed job and the nightly re-index's local embed.

An embed output directory (written as a whole under a temporary name, see
contracts.storage.atomic_dir) holds
    part-NNNNN.parquet  the embeddings contract + content_hash, <= rows_per_file rows each
    _errors.parquet     images that could not be embedded (image_id, reason)
    _embed.json         counts and model id (written by the caller)
Plus what an incremental run needs: the row keys of an earlier output and a streamed copy of
its unchanged rows. Arrow and numpy only: no Ray, no model.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.keys import KEY_COLUMNS, row_keys
from contracts.vectors import check_files_agree, check_schema, open_dataset

__all__ = [
    "DUPLICATE_REASON",
    "ERRORS_FILE",
    "SUMMARY_FILE",
    "DuplicateFilter",
    "EmbedOutput",
    "PartWriter",
    "copy_carried",
    "previous_keys",
    "write_errors",
]

ERRORS_FILE = "_errors.parquet"
SUMMARY_FILE = "_embed.json"
DUPLICATE_REASON = "duplicate image_id: already embedded from an earlier sample (the input holds it twice)"


class PartWriter:
    """Rows of `schema` -> directory/part-NNNNN.parquet files of <= rows_per_file rows each.
    `rows` counts the rows written, `parts` the files opened."""

    def __init__(self, directory: str, schema: pa.Schema, rows_per_file: int):
        if rows_per_file < 1:
            raise ValueError(f"rows per file must be >= 1, got {rows_per_file}")
        self.dir, self.schema, self.limit = directory, schema, rows_per_file
        self.writer: pq.ParquetWriter | None = None
        self.parts = self.in_part = self.rows = 0

    def write(self, table: pa.Table) -> int:
        """Append `table` (its columns selected and cast to the schema); returns its row count."""
        table = table.select(self.schema.names).cast(self.schema)
        start = 0
        while start < table.num_rows:
            if self.writer is None or self.in_part >= self.limit:
                self.close()
                self.writer = pq.ParquetWriter(f"{self.dir}/part-{self.parts:05d}.parquet", self.schema)
                self.parts += 1
                self.in_part = 0
            take = min(table.num_rows - start, self.limit - self.in_part)
            self.writer.write_table(table.slice(start, take))
            start += take
            self.in_part += take
            self.rows += take
        return table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DuplicateFilter:
    """Keeps the first row of each image_id across everything the job writes; a later row with
    the same image_id (two copies of a shard, an overlapping glob) becomes an error row instead.
    Why not refuse the job: the first copy is a correct embedding and the run may have cost
    hours; the duplicates are listed in _errors.parquet and counted in _embed.json, and the
    output keeps the contract (image_id unique) that build_index / query / evaluate check."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """table with an image_id column -> (first-seen rows, error rows (image_id, reason))."""
        keep = []
        for image_id in table.column("image_id").to_pylist():
            keep.append(image_id not in self.seen)
            self.seen.add(image_id)
        mask = pa.array(keep, pa.bool_())
        dups = table.filter(pc.invert(mask)).column("image_id")
        errors = pa.table({"image_id": dups.cast(pa.string()),
                           "reason": pa.array([DUPLICATE_REASON] * len(dups), pa.string())})
        return table.filter(mask), errors


def previous_keys(prev: str, model_id: str, say: Callable[[str], None] = print) -> np.ndarray:
    """Sorted (P,) int64 row keys (contracts.keys.row_keys) of an earlier embed output made by
    model `model_id`; empty (nothing carried, and `say` tells why) when another model made it or
    it has no content_hash column."""
    ds = open_dataset(prev)
    meta = check_schema(ds.schema, "embeddings", prev)
    check_files_agree(ds, prev)
    if meta.model != model_id:
        say(f"embed: --incremental {prev} was made by model {meta.model}, not {model_id}: nothing carried")
        return np.empty(0, np.int64)
    if "content_hash" not in ds.schema.names:
        say(f"embed: --incremental {prev} has no content_hash column: nothing carried")
        return np.empty(0, np.int64)
    cols = [c for c in KEY_COLUMNS if c in ds.schema.names]
    keys = [row_keys(b) for b in ds.to_batches(columns=cols) if b.num_rows]
    return np.sort(np.concatenate(keys)) if keys else np.empty(0, np.int64)


def copy_carried(prev: str, carried: np.ndarray, write: Callable[[pa.Table], int],
                 batch_size: int = 8192) -> int:
    """Stream the earlier output `prev` and write(table) its rows whose key is in `carried`
    (sorted (C,) int64); write returns the rows it kept. Returns the rows written."""
    if len(carried) == 0:
        return 0
    n = 0
    for b in open_dataset(prev).to_batches(batch_size=batch_size):
        if b.num_rows == 0:
            continue
        keys = row_keys(b)
        pos = np.clip(np.searchsorted(carried, keys), 0, len(carried) - 1)
        keep = carried[pos] == keys
        if keep.any():
            n += write(pa.Table.from_batches([b]).filter(pa.array(keep)))
    return n


def write_errors(out_dir: str, errors: list[pa.Table], rows_written: int) -> pa.Table:
    """Write out_dir/_errors.parquet (image_id, reason) and return it; refuse (ValueError naming
    the first reason) an output with no embedded row at all: every image failed."""
    error_table = (pa.concat_tables(errors) if errors else
                   pa.table({"image_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())}))
    if rows_written == 0:
        first = error_table.column("reason")[0].as_py() if error_table.num_rows else "no images"
        raise ValueError(f"nothing embedded: {error_table.num_rows} error(s), first: {first}")
    pq.write_table(error_table, os.path.join(out_dir, ERRORS_FILE))
    return error_table


class EmbedOutput:
    """One embed run's output directory (a temporary one, see contracts.storage.atomic_dir):
    embedded rows into part files (first copy of each image_id only), error rows, the keys of
    rows to carry from an earlier output, then `finish` writes the carried rows, _errors.parquet
    and _embed.json.

    schema: the embeddings contract + content_hash (contracts.vectors.embeddings_schema(...)
    .append(content_hash)); model_id and dim go into the summary."""

    def __init__(self, directory: str, schema: pa.Schema, rows_per_file: int, model_id: str, dim: int):
        self.dir, self.model_id, self.dim = directory, model_id, dim
        self.writer = PartWriter(directory, schema, rows_per_file)
        self.first_copy = DuplicateFilter()
        self.errors: list[pa.Table] = []
        self.carried: list[np.ndarray] = []
        self.embedded = 0

    def write_rows(self, table: pa.Table) -> int:
        """Write the rows whose image_id was not written before (the others become error rows);
        returns the rows written."""
        table, dups = self.first_copy(table)
        if dups.num_rows:
            self.errors.append(dups)
        return self.writer.write(table)

    def add(self, good: pa.Table, errors: pa.Table, carried_keys: np.ndarray) -> None:
        """One batch as model.embedding.split_embedded returns it: (embedded rows, error rows
        (image_id, reason), (C,) int64 keys of the rows to carry)."""
        if good.num_rows:
            self.embedded += self.write_rows(good)
        if errors.num_rows:
            self.errors.append(errors)
        if len(carried_keys):
            self.carried.append(carried_keys)

    @property
    def n_errors(self) -> int:
        return sum(e.num_rows for e in self.errors)

    @property
    def n_unchanged(self) -> int:
        """Rows marked to carry so far (not yet copied)."""
        return sum(len(k) for k in self.carried)

    def finish(self, previous: str | None, **extra) -> tuple[dict, pa.Table]:
        """Copy the carried rows of `previous`, close the part files, write _errors.parquet and
        _embed.json (counts, model, dim, plus `extra`). Returns (summary, error table); raises
        ValueError when nothing at all was embedded or carried."""
        try:
            keys = np.unique(np.concatenate(self.carried)) if self.carried else np.empty(0, np.int64)
            n_carried = copy_carried(previous, keys, self.write_rows) if previous else 0
        finally:
            self.writer.close()
        error_table = write_errors(self.dir, self.errors, self.writer.rows)
        summary = {"model": self.model_id, "dim": self.dim, "embedded": self.embedded, "carried": n_carried,
                   "errors": error_table.num_rows, "rows": self.writer.rows, "files": self.writer.parts,
                   **extra}
        with open(os.path.join(self.dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        return summary, error_table

    def close(self) -> None:
        self.writer.close()
