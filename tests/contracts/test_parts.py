"""contracts.parts: the embed output layout (part files, carried rows, error file), no Ray."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.keys import row_keys
from contracts.parts import ERRORS_FILE, PartWriter, copy_carried, previous_keys, write_errors
from contracts.vectors import embeddings_schema, l2_normalize, make_embeddings_table, read_vectors

DIM = 4


def _emb(n: int, model: str = "m1", seed: int = 0, start: int = 0) -> pa.Table:
    vecs = l2_normalize(np.random.default_rng(seed).normal(size=(n, DIM)))
    ids = [f"img{i:03d}" for i in range(start, start + n)]
    t = make_embeddings_table(ids, [str(i % 3) for i in range(n)], [i % 2 for i in range(n)],
                              ["gallery"] * n, vecs, model)
    return t.append_column("content_hash", pa.array([f"h{i}" for i in range(start, start + n)], pa.string()))


def _schema(model: str = "m1") -> pa.Schema:
    return embeddings_schema(DIM, model).append(pa.field("content_hash", pa.string()))


def test_part_writer_splits_rows_into_capped_files(tmp_path):
    with PartWriter(str(tmp_path), _schema(), rows_per_file=4) as w:
        assert w.write(_emb(3)) == 3
        assert w.write(_emb(6, start=3)) == 6
    assert (w.rows, w.parts) == (9, 3)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(tmp_path / f).num_rows for f in files] == [4, 4, 1]
    back = read_vectors(str(tmp_path), kind="embeddings")
    assert back.image_ids.tolist() == [f"img{i:03d}" for i in range(9)]
    with pytest.raises(ValueError, match="rows per file"):
        PartWriter(str(tmp_path), _schema(), 0)


def test_previous_keys_and_copy_carried(tmp_path):
    prev = tmp_path / "prev"
    prev.mkdir()
    old = _emb(6)
    with PartWriter(str(prev), _schema(), 4) as w:
        w.write(old)
    keys = previous_keys(str(prev), "m1")
    assert keys.tolist() == sorted(row_keys(old).tolist())
    said = []
    assert len(previous_keys(str(prev), "other", said.append)) == 0 and "not other" in said[0]
    # carry rows 1 and 4: exactly those rows come back, vectors untouched
    carried = np.sort(row_keys(old.take([1, 4])))
    out = tmp_path / "out"
    out.mkdir()
    with PartWriter(str(out), _schema(), 100) as w2:
        n = copy_carried(str(prev), carried, w2.write, batch_size=2)
    assert n == 2 and w2.rows == 2
    got = read_vectors(str(out), kind="embeddings")
    assert got.image_ids.tolist() == ["img001", "img004"]
    want = read_vectors(str(prev), kind="embeddings")
    assert np.array_equal(got.vectors, want.vectors[[1, 4]])
    assert copy_carried(str(prev), np.empty(0, np.int64), w2.write) == 0


def test_write_errors_writes_the_file_and_refuses_an_empty_output(tmp_path):
    errs = [pa.table({"image_id": ["x"], "reason": ["undecodable image"]})]
    t = write_errors(str(tmp_path), errs, rows_written=3)
    assert pq.read_table(tmp_path / ERRORS_FILE).equals(t) and t.num_rows == 1
    with pytest.raises(ValueError, match="nothing embedded: 1 error.*undecodable image"):
        write_errors(str(tmp_path / "none"), errs, rows_written=0)


def test_embed_output_writes_rows_errors_carried_and_summary(tmp_path):
    import json

    from contracts.parts import DUPLICATE_REASON, SUMMARY_FILE, EmbedOutput

    prev = tmp_path / "prev"
    prev.mkdir()
    old = _emb(4)
    with PartWriter(str(prev), _schema(), 100) as w:
        w.write(old)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = EmbedOutput(str(out_dir), _schema(), 3, "m1", DIM)
    new = _emb(3, seed=1, start=10)
    bad = pa.table({"image_id": ["broken.jpg"], "reason": ["undecodable image"]})
    out.add(new, bad, np.sort(row_keys(old.take([0, 2]))))
    out.add(new.slice(0, 1), bad.slice(0, 0), np.empty(0, np.int64))  # the same image again
    assert (out.embedded, out.n_errors, out.n_unchanged) == (3, 2, 2)
    summary, errors = out.finish(str(prev), seconds=1.5)
    assert summary == {"model": "m1", "dim": DIM, "embedded": 3, "carried": 2, "errors": 2, "rows": 5,
                       "files": 2, "seconds": 1.5}
    assert json.loads((out_dir / SUMMARY_FILE).read_text()) == summary
    assert errors.column("image_id").to_pylist() == ["broken.jpg", "img010"]
    assert errors.column("reason").to_pylist()[1] == DUPLICATE_REASON
    got = read_vectors(str(out_dir), kind="embeddings")
    assert sorted(got.image_ids.tolist()) == ["img000", "img002", "img010", "img011", "img012"]


def test_embed_output_with_nothing_embedded_is_refused(tmp_path):
    from contracts.parts import EmbedOutput

    out = EmbedOutput(str(tmp_path), _schema(), 3, "m1", DIM)
    out.add(_emb(0), pa.table({"image_id": ["a"], "reason": ["unreadable file"]}), np.empty(0, np.int64))
    with pytest.raises(ValueError, match="nothing embedded: 1 error"):
        out.finish(None)
