"""The one key of an embeddings row: what decides whether a row can be carried over or changed.

A row's vector depends (for one model) on its image id, the bytes of its image (content hash)
and its labels. `row_keys` turns those five columns into a 64-bit key per row; the embed job
uses it to carry unchanged rows, the nightly re-index to find added and removed rows.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["KEY_COLUMNS", "row_keys"]

# The order is part of the key: changing it changes every key.
KEY_COLUMNS = ("image_id", "content_hash", "item_id", "camera_id", "split")
_SEP = "\x1f"  # unit separator: never inside an id, a hash or a split name


def _key_text(table: pa.Table | pa.RecordBatch) -> list[str]:
    cols = []
    for name in KEY_COLUMNS:
        if name not in table.schema.names:
            if name == "content_hash":  # without it "unchanged" cannot be decided at all
                from contracts.vectors import VectorFileError

                raise VectorFileError("embeddings have no content_hash column (not written by embed)")
            cols.append(pa.array([""] * table.num_rows, pa.string()))
            continue
        col = table.column(name)
        if not pa.types.is_string(col.type):
            col = pc.cast(col, pa.string())
        cols.append(pc.fill_null(col, ""))
    return pc.binary_join_element_wise(*cols, _SEP).to_pylist()


def row_keys(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """(N,) int64 key of each row of a table with KEY_COLUMNS (content_hash required; a missing
    label column or a null counts as ""). Equal keys -> the same vector for the same model.

    The key is the first 8 bytes (little-endian, signed) of blake2b over the five values joined
    by U+001F; a collision needs ~2^32 rows.
    """
    texts = _key_text(table)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts),
        dtype=np.int64, count=len(texts))
