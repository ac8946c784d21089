"""contracts.keys.row_keys: the one row key, equal to both keys it replaced."""
import hashlib

import numpy as np
import pyarrow as pa
import pytest

from contracts.keys import KEY_COLUMNS, row_keys
from contracts.vectors import VectorFileError


def _old_model_key(image_id, chash, item_id, camera_id, split) -> int:
    # model/embedding.py:row_key before the merge, verbatim
    text = "\x1f".join([str(image_id), str(chash), str(item_id),
                        "" if camera_id is None else str(int(camera_id)), str(split or "")])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _table():
    return pa.table({
        "image_id": pa.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], pa.string()),
        "item_id": pa.array(["1", "1", "2", "-1"], pa.string()),
        "camera_id": pa.array([3, None, 0, 12], pa.int32()),
        "split": pa.array(["gallery", None, "gallery", "query"], pa.string()),
        "content_hash": pa.array(["h1", "h2", "h3", "h4"], pa.string()),
    })


def test_row_keys_equal_the_old_model_keys():
    t = _table()
    want = [_old_model_key(*(t.column(c)[i].as_py() for c in
                             ("image_id", "content_hash", "item_id", "camera_id", "split")))
            for i in range(t.num_rows)]
    got = row_keys(t)
    assert got.dtype == np.int64 and got.tolist() == want
    assert row_keys(t.to_batches()[0]).tolist() == want  # record batches too


def test_row_keys_tell_rows_apart_like_the_old_nightly_keys():
    # the old nightly key was the joined text itself: two rows had equal keys iff equal text
    t = _table()
    relabelled = t.set_column(1, "item_id", pa.array(["1", "1", "2", "0"], pa.string()))
    rehashed = t.set_column(4, "content_hash", pa.array(["h1", "h2", "x", "h4"], pa.string()))
    recam = t.set_column(2, "camera_id", pa.array([3, 4, 0, 12], pa.int32()))
    base = row_keys(t)
    assert (row_keys(relabelled) == base).tolist() == [True, True, True, False]
    assert (row_keys(rehashed) == base).tolist() == [True, True, False, True]
    assert (row_keys(recam) == base).tolist() == [True, False, True, True]
    assert len(set(base.tolist())) == 4
    # column order in the table does not matter, only KEY_COLUMNS' order
    assert row_keys(t.select(list(reversed(KEY_COLUMNS)))).tolist() == base.tolist()


def test_row_keys_need_a_content_hash_and_default_missing_labels():
    t = _table()
    with pytest.raises(VectorFileError, match="no content_hash"):
        row_keys(t.drop_columns(["content_hash"]))
    no_split = t.drop_columns(["split"])
    want = [_old_model_key(i, h, it, c, None) for i, h, it, c in zip(
        *(no_split.column(c).to_pylist() for c in ("image_id", "content_hash", "item_id", "camera_id")))]
    assert row_keys(no_split).tolist() == want
    assert row_keys(t.slice(0, 0)).tolist() == []
