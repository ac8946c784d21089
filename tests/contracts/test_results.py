import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.results import (
    RESULTS_SCHEMA,
    ResultsFileError,
    ResultsWriter,
    make_results_table,
    read_ranked_lists,
    read_results,
    results_metadata,
    write_results,
)


def test_roundtrip_with_padding_and_nulls(tmp_path):
    items = np.array([["a", "b", None], ["c", None, None]], dtype=object)
    images = np.array([["a1", "b1", None], ["c1", None, None]], dtype=object)
    scores = np.array([[0.9, 0.5, -np.inf], [0.8, -np.inf, -np.inf]], dtype=np.float32)
    valid = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
    t = make_results_table(["q1", "q2"], items, images, scores, valid)
    assert t.schema == RESULTS_SCHEMA and t.num_rows == 3
    assert t.column("rank").to_pylist() == [0, 1, 0]
    with ResultsWriter(str(tmp_path / "res"), meta={"k": 3}) as w:
        w.write(t.slice(0, 2))
        w.write(t.slice(2))
    assert results_metadata(str(tmp_path / "res")) == {"k": 3}
    back = read_results(str(tmp_path / "res"))
    assert back.to_pydict() == t.to_pydict()
    rl = read_ranked_lists(str(tmp_path / "res"), query_ids=["q2", "q1", "q3"])
    assert rl.item_ids.tolist() == [["c", None], ["a", "b"], [None, None]]
    assert rl.image_ids.tolist() == [["c1", None], ["a1", "b1"], [None, None]]
    assert rl.valid.tolist() == [[True, False], [True, True], [False, False]]
    np.testing.assert_array_equal(rl.scores[1], np.float32([0.9, 0.5]))


def test_centroid_mode_has_null_image_ids(tmp_path):
    t = make_results_table(["q"], np.array([["x", "y"]], dtype=object), None, np.array([[1.0, 0.5]]))
    write_results(t, str(tmp_path / "r"))
    assert read_results(str(tmp_path / "r")).column("image_id").null_count == 2
    assert read_ranked_lists(str(tmp_path / "r")).image_ids is None


def test_failed_write_keeps_previous_output(tmp_path):
    out = str(tmp_path / "r")
    t = make_results_table(["q"], np.array([["x"]], dtype=object), None, np.array([[1.0]]))
    write_results(t, out)
    with pytest.raises(RuntimeError), ResultsWriter(out) as w:
        w.write(t)
        raise RuntimeError("crash")
    assert read_results(out).num_rows == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_rejects_files_off_contract(tmp_path):
    pq.write_table(pa.table({"query_id": ["q"], "rank": pa.array([0], pa.int32())}), tmp_path / "bad.parquet")
    with pytest.raises(ResultsFileError, match="missing column item_id"):
        read_results(str(tmp_path / "bad.parquet"))
    wrong = pa.table([pa.array(["q"]), pa.array([0], pa.int64()), pa.array(["a"]), pa.nulls(1, pa.string()),
                      pa.array([1.0], pa.float32())], names=RESULTS_SCHEMA.names)
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    with pytest.raises(ResultsFileError, match="rank is int64, expected int32"):
        read_results(str(tmp_path / "wrong.parquet"))
    dup = pa.table([pa.array(["q", "q"]), pa.array([0, 0], pa.int32()), pa.array(["a", "b"]),
                    pa.nulls(2, pa.string()), pa.array([1.0, 0.5], pa.float32())], schema=RESULTS_SCHEMA)
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(ResultsFileError, match="duplicate"):
        read_ranked_lists(str(tmp_path / "dup.parquet"))
