"""Query results contract (DESIGN.md, "Query results"): one row per query x rank.

| column   | type             | meaning                                        |
|----------|------------------|------------------------------------------------|
| query_id | string, not null | the query's image_id                           |
| rank     | int32, not null  | 0-based position in the query's ranked list    |
| item_id  | string, not null | the retrieved item                             |
| image_id | string, nullable | the retrieved image (null in centroid mode)    |
| score    | float32          | similarity, higher is more similar             |

A results output is a directory of ``part-NNNNN.parquet`` files, written under a temporary
name and renamed into place complete (`ResultsWriter`), read back by `read_results` (table)
or `read_ranked_lists` ((Q, k) arrays for evaluation).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.storage import atomic_dir
from contracts.vectors import open_dataset

__all__ = [
    "RESULTS_META_KEY",
    "RESULTS_SCHEMA",
    "RankedLists",
    "ResultsFileError",
    "ResultsWriter",
    "check_results_schema",
    "make_results_table",
    "read_ranked_lists",
    "read_results",
    "results_metadata",
    "write_results",
]

RESULTS_META_KEY = b"centroid_retrieval_results"

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=True),
        pa.field("score", pa.float32(), nullable=False),
    ]
)


class ResultsFileError(ValueError):
    """A results file that does not follow the query-results contract."""


def make_results_table(query_ids, item_ids: np.ndarray, image_ids: np.ndarray | None,
                       scores: np.ndarray, valid: np.ndarray | None = None) -> pa.Table:
    """Ranked lists -> results table (rows ordered by query, then rank).

    query_ids: (Q,) str; item_ids: (Q, k) object/str; image_ids: (Q, k) object/str or None
    (centroid mode: the column is all null); scores: (Q, k) float, each row sorted descending;
    valid: (Q, k) bool, False for padding slots (fewer than k hits) which are dropped.
    """
    item_ids = np.asarray(item_ids, dtype=object)
    scores = np.asarray(scores, dtype=np.float32)
    q, k = scores.shape
    if item_ids.shape != (q, k) or len(query_ids) != q:
        raise ResultsFileError(f"shape mismatch: {len(query_ids)} queries, item_ids {item_ids.shape}, "
                               f"scores {scores.shape}")
    if valid is None:
        valid = np.ones((q, k), dtype=bool)
    rows, ranks = np.nonzero(valid)  # row-major: by query then rank
    qids = np.asarray(query_ids, dtype=object)[rows]
    img = (pa.nulls(len(rows), pa.string()) if image_ids is None
           else pa.array(np.asarray(image_ids, dtype=object)[rows, ranks], pa.string()))
    # rank = position among the valid slots of the row (valid slots are a prefix in practice)
    rank = (np.cumsum(valid, axis=1) - 1)[rows, ranks].astype(np.int32)
    return pa.table(
        [pa.array(qids, pa.string()), pa.array(rank, pa.int32()),
         pa.array(item_ids[rows, ranks], pa.string()), img, pa.array(scores[rows, ranks], pa.float32())],
        schema=RESULTS_SCHEMA,
    )


class ResultsWriter:
    """Write results in parts into a temporary directory; ``out_dir`` appears only on success.

    with ResultsWriter(out_dir, meta={...}) as w:
        w.write(table)           # any number of times
    An existing ``out_dir`` is replaced only once the new one is complete; on error it is kept.
    """

    def __init__(self, out_dir: str, meta: dict | None = None):
        self.out_dir = str(out_dir)
        self.meta = meta or {}
        self._ctx = None
        self._tmp = None
        self.parts = 0
        self.rows = 0

    def __enter__(self):
        self._ctx = atomic_dir(self.out_dir)  # a URI is staged locally, then published
        self._tmp = self._ctx.__enter__()
        return self

    @property
    def tmp_dir(self) -> str:
        """The temporary directory being filled (for side files such as _errors.parquet)."""
        return self._tmp

    def write(self, table: pa.Table) -> None:
        if table.schema.remove_metadata() != RESULTS_SCHEMA:
            table = table.cast(RESULTS_SCHEMA)
        schema = RESULTS_SCHEMA.with_metadata({RESULTS_META_KEY: json.dumps(self.meta).encode()})
        pq.write_table(table.replace_schema_metadata(schema.metadata),
                       os.path.join(self._tmp, f"part-{self.parts:05d}.parquet"))
        self.parts += 1
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.parts == 0:
            self.write(RESULTS_SCHEMA.empty_table())  # an empty result set is still a valid output
        return self._ctx.__exit__(exc_type, exc, tb)


def write_results(table: pa.Table, out_dir: str, meta: dict | None = None) -> None:
    """Write one results table atomically as ``out_dir/part-00000.parquet``."""
    with ResultsWriter(out_dir, meta) as w:
        w.write(table)


def check_results_schema(schema: pa.Schema, where: str) -> None:
    for field in RESULTS_SCHEMA:
        if field.name not in schema.names:
            raise ResultsFileError(f"{where}: not a query-results file, missing column {field.name}")
        got = schema.field(field.name).type
        if got != field.type and not (field.type == pa.string() and got == pa.large_string()):
            raise ResultsFileError(f"{where}: column {field.name} is {got}, expected {field.type}")


def read_results(path: str) -> pa.Table:
    """Read a results directory (or one file), validate the contract, sort by (query_id, rank)."""
    ds = open_dataset(path)
    check_results_schema(ds.schema, path)
    table = ds.to_table(columns=RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA)
    for name in ("query_id", "rank", "item_id", "score"):
        if table.column(name).null_count:
            raise ResultsFileError(f"{path}: column {name} has null values")
    return table.sort_by([("query_id", "ascending"), ("rank", "ascending")])


def results_metadata(path: str) -> dict:
    """The JSON metadata a `ResultsWriter` stored (index version, k, mode...), or {}."""
    raw = (open_dataset(path).schema.metadata or {}).get(RESULTS_META_KEY)
    return json.loads(raw) if raw else {}


@dataclass
class RankedLists:
    """Results as arrays. query_ids: (Q,) object; item_ids/image_ids: (Q, k) object with None in
    padding slots (image_ids is None in centroid mode); scores: (Q, k) float32 with -inf padding;
    valid: (Q, k) bool."""

    query_ids: np.ndarray
    item_ids: np.ndarray
    image_ids: np.ndarray | None
    scores: np.ndarray
    valid: np.ndarray

    @property
    def k(self) -> int:
        return self.scores.shape[1]


def read_ranked_lists(path: str, query_ids=None) -> RankedLists:
    """Read results into (Q, k) arrays, k = the longest list. query_ids: order (and subset) of
    the rows; a query with no results gets an all-padding row."""
    table = read_results(path)
    qcol = table.column("query_id")
    uniq = pc.unique(qcol).to_numpy(zero_copy_only=False).astype(object)
    order = uniq if query_ids is None else np.asarray(query_ids, dtype=object)
    pos = {q: i for i, q in enumerate(order)}
    row = np.array([pos.get(q, -1) for q in qcol.to_pylist()], dtype=np.int64)
    rank = table.column("rank").to_numpy()
    if len(rank) and rank.min() < 0:
        raise ResultsFileError(f"{path}: negative rank")
    k = int(rank.max()) + 1 if len(rank) else 0
    keep = row >= 0
    row, rank = row[keep], rank[keep]
    q = len(order)
    items = np.full((q, k), None, dtype=object)
    scores = np.full((q, k), -np.inf, dtype=np.float32)
    valid = np.zeros((q, k), dtype=bool)
    if len(np.unique(row * max(k, 1) + rank)) != len(row):
        raise ResultsFileError(f"{path}: duplicate (query_id, rank) rows")
    items[row, rank] = np.asarray(table.column("item_id").to_pylist(), dtype=object)[keep]
    scores[row, rank] = table.column("score").to_numpy()[keep]
    valid[row, rank] = True
    img_col = table.column("image_id")
    images = None
    if img_col.null_count < len(img_col):
        images = np.full((q, k), None, dtype=object)
        images[row, rank] = np.asarray(img_col.to_pylist(), dtype=object)[keep]
    return RankedLists(order, items, images, scores, valid)
