"""pipelines/centroids.py: distributed groupby-mean equals a numpy reference; bad input exits 2."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from contracts.vectors import make_embeddings_table, read_vectors, write_table_atomic
from index.centroids import aggregate as C

REPO = Path(__file__).resolve().parents[2]


def write_embeddings(d: Path, n=3000, dim=32, items=150, files=3, seed=0, nan_row=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    it = np.array([str(i) for i in rng.integers(0, items, n)], dtype=object)
    cam = [None if i % 11 == 0 else int(rng.integers(1, 7)) for i in range(n)]
    split = np.where(np.arange(n) % 4 == 0, "query", "gallery")
    if nan_row is not None:
        x[nan_row, 0] = np.nan
    d.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        s = slice(k * n // files, (k + 1) * n // files)
        t = make_embeddings_table([f"img{j}" for j in range(n)][s], it[s], cam[s], split[s],
                                  np.nan_to_num(x[s]) if nan_row is not None else x[s], "model-x")
        if nan_row is not None and s.start <= nan_row < s.stop:  # bypass the writer's own check
            import pyarrow as pa

            from contracts.vectors import embeddings_to_arrow
            t = t.set_column(4, pa.field("embedding", t.schema.field("embedding").type), embeddings_to_arrow(x[s]))
        write_table_atomic(t, str(d / f"part-{k}.parquet"))
    cams = np.array([-1 if c is None else c for c in cam])
    return it, cams, split, x


def run(*args):
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "centroids.py"), *args],
                          check=False, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_centroids_equal_numpy_reference(tmp_path, ray_local):
    from pipelines.centroids import main

    it, cams, split, x = write_embeddings(tmp_path / "emb")
    out = tmp_path / "out"
    assert main(["--embeddings", str(tmp_path / "emb"), "--out", str(out), "--split", "gallery",
                 "--batch-size", "500", "--buckets", "3"]) == 0
    g = split == "gallery"
    ref = C.centroids_reference(it[g], cams[g], x[g])
    got = read_vectors(str(out / "centroids.parquet"), kind="centroids")
    assert got.meta.model == "model-x"
    order = np.argsort(got.item_ids.astype(str))
    assert list(got.item_ids[order]) == list(ref.item_ids)
    assert np.abs(got.vectors[order] - ref.embeddings).max() < 1e-5
    table = pq.read_table(out / "centroids.parquet")
    assert table.column("count").to_numpy()[order].tolist() == ref.counts.tolist()
    assert [table.column("camera_ids").to_pylist()[i] for i in order] == ref.camera_ids
    # per-(item, camera) sums against plain numpy
    sums, model = C.read_pair_sums(str(out / "item_camera_sums.parquet"))
    assert model == "model-x"
    seen = 0
    for i, c, s, n in zip(sums.item_ids, sums.camera_ids, sums.sums, sums.counts):
        m = g & (it == i) & (cams == c)
        assert n == m.sum() and np.abs(s - x[m].astype(np.float64).sum(0)).max() < 1e-5
        seen += n
    assert seen == g.sum()

    # NaN inside the data (found by a Ray worker): one-line error, previous output kept
    write_embeddings(tmp_path / "bad", nan_row=1234)
    from contracts.vectors import VectorFileError

    with pytest.raises(VectorFileError, match="NaN"):
        main(["--embeddings", str(tmp_path / "bad"), "--out", str(out)])
    assert (out / "centroids.parquet").exists()


def run_inprocess(capsys, *args):
    from pipelines._cli import run_main
    from pipelines.centroids import main

    with pytest.raises(SystemExit) as e:
        run_main(main, list(args))
    return e.value.code, capsys.readouterr().err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    write_embeddings(tmp_path / "emb", n=40, items=5, files=1)
    r = run("--embeddings", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
    # a centroids file is not an embeddings file (wrong schema)
    import pyarrow as pa

    t = pa.table({"item_id": ["a"], "x": [1]})
    pq.write_table(t, tmp_path / "wrong.parquet")
    code, err = run_inprocess(capsys, "--embeddings", str(tmp_path / "wrong.parquet"), "--out", str(tmp_path / "o"))
    assert code == 2 and "missing column" in err and err.strip().count("\n") == 0
    # an empty embeddings file
    empty = make_embeddings_table([], [], [], [], np.zeros((0, 8), np.float32), "m")
    pq.write_table(empty, tmp_path / "empty.parquet")
    code, err = run_inprocess(capsys, "--embeddings", str(tmp_path / "empty.parquet"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no embeddings rows" in err
    assert not (tmp_path / "o").exists()
