import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    items_of,
    make_manifest_table,
    make_rejected_table,
    manifest_to_bytes,
    read_manifest,
    split_counts,
    write_manifest,
)


def row(image_id, item="1", cam=1, split="train"):
    return {"image_id": image_id, "item_id": item, "camera_id": cam, "split": split,
            "path": image_id}


def test_table_has_contract_schema_and_is_sorted():
    t = make_manifest_table([row("b.jpg", "2", None, "query"), row("a.jpg", "-1", 3, "gallery")])
    assert t.schema.equals(MANIFEST_SCHEMA)
    assert t.column("image_id").to_pylist() == ["a.jpg", "b.jpg"]
    assert t.column("camera_id").to_pylist() == [3, None]
    assert split_counts(t) == {"train": 0, "query": 1, "gallery": 1}
    assert items_of(t, "gallery") == {"-1"}


def test_write_read_round_trip_and_bytes_are_stable(tmp_path):
    rows = [row(f"x/{i}.jpg", str(i % 3), i % 2 or None, "train") for i in range(10)]
    t = make_manifest_table(rows)
    write_manifest(t, tmp_path / "m.parquet")
    back = read_manifest(tmp_path / "m.parquet")
    assert back.equals(t)
    # Input order does not matter: the bytes depend only on the rows.
    assert manifest_to_bytes(make_manifest_table(rows[::-1])) == (tmp_path / "m.parquet").read_bytes()


@pytest.mark.parametrize("bad, message", [
    ([row("a"), row("a")], "not unique"),
    ([row("a", split="test")], "split 'test'"),
    ([row("a", item=None)], "item_id has 1 null"),
    ([row("")], "empty string"),
])
def test_contract_violations_are_reported(bad, message):
    with pytest.raises(ManifestError, match=message):
        make_manifest_table(bad)


def test_read_manifest_checks_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"image_id": ["a"], "item_id": ["1"]}), tmp_path / "cols.parquet")
    with pytest.raises(ManifestError, match="missing column.*camera_id"):
        read_manifest(tmp_path / "cols.parquet")
    t = pa.table({"image_id": ["a"], "item_id": ["1"], "camera_id": ["c1"], "split": ["train"],
                  "path": ["a"]})
    pq.write_table(t, tmp_path / "type.parquet")
    with pytest.raises(ManifestError, match="camera_id has type string"):
        read_manifest(tmp_path / "type.parquet")


def test_read_manifest_accepts_compatible_types(tmp_path):
    t = pa.table({"path": ["a"], "image_id": pa.array(["a"], pa.large_string()), "item_id": ["7"],
                  "camera_id": pa.array([2], pa.int64()), "split": ["query"], "extra": [1.0]})
    pq.write_table(t, tmp_path / "m.parquet")
    back = read_manifest(tmp_path / "m.parquet")
    assert back.schema.equals(MANIFEST_SCHEMA)
    assert back.to_pylist() == [row("a", "7", 2, "query")]


def test_rejected_table_sorted():
    t = make_rejected_table([("b", "x"), ("a", "y")])
    assert t.to_pylist() == [{"path": "a", "reason": "y"}, {"path": "b", "reason": "x"}]


def test_write_manifest_is_atomic(tmp_path):
    target = tmp_path / "m.parquet"
    write_manifest(make_manifest_table([row("a")]), target)
    before = target.read_bytes()
    bad = make_manifest_table([row("a")]).set_column(3, "split", pa.array(["nope"]))
    with pytest.raises(ManifestError):
        write_manifest(bad, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]


def test_write_manifest_failing_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import contracts.manifest as M

    target = tmp_path / "m.parquet"
    write_manifest(make_manifest_table([row("a")]), target)
    before = target.read_bytes()

    def half(table, where, **kw):  # a full disk half-way through the Parquet file
        with kw["filesystem"].open_output_stream(where) as f:
            f.write(b"PAR1")
        raise OSError("No space left on device")

    monkeypatch.setattr(M.pq, "write_table", half)
    with pytest.raises(OSError, match="No space"):
        write_manifest(make_manifest_table([row("b")]), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]
