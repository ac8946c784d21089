import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from contracts.vectors import (
    l2_normalize,
    make_centroids_table,
    make_embeddings_table,
    read_vectors,
    write_table_atomic,
)
from index.ann.whitening import WhiteningError, load_whitening
from pipelines.whiten import main

REPO = Path(__file__).resolve().parents[2]


def run_whiten(*args):
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "whiten.py"), *map(str, args)],
                          check=False, capture_output=True, text=True)


def vectors(n, d=24, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.logspace(0, -1.5, d)[None, :]
    return l2_normalize(rng.normal(size=(n, d)) @ mix.T + rng.normal(size=d))


@pytest.fixture
def emb_file(tmp_path):
    """One embeddings file holding 200 gallery and 40 query rows (model m1, D=24)."""
    x = vectors(240)
    splits = ["gallery"] * 200 + ["query"] * 40
    ids = [f"{s}/{i:04d}.jpg" for i, s in enumerate(splits)]
    items = [str(i % 30) for i in range(240)]
    cams = [i % 6 for i in range(240)]
    path = tmp_path / "emb.parquet"
    write_table_atomic(make_embeddings_table(ids, items, cams, splits, x, "m1"), str(path))
    return path, x, ids, items


def test_fit_then_apply_cli(emb_file, tmp_path):
    path, x, ids, items = emb_file
    npz = tmp_path / "w" / "pcaw8.npz"
    r = run_whiten("--embeddings", path, "--dim", 8, "--out", npz)
    assert r.returncode == 0, r.stderr
    w = load_whitening(str(npz))
    assert (w.input_dim, w.dim, w.n_samples, w.model) == (24, 8, 200, "m1")  # gallery rows only
    gallery = x[:200].astype(np.float64)
    assert np.allclose(w.mean, gallery.mean(axis=0), atol=1e-6)

    out = tmp_path / "emb_w8"
    r = run_whiten("--apply", npz, "--embeddings", path, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "240" in r.stdout
    got = read_vectors(str(out))
    assert got.meta.dim == 8 and got.meta.model == "m1+pcaw8" and got.meta.normalized
    assert list(got.image_ids) == ids and list(got.item_ids) == items
    assert list(got.table.column("split").to_pylist()) == ["gallery"] * 200 + ["query"] * 40
    assert np.allclose(got.vectors, w.apply(x), atol=1e-6)
    # whitened gallery: decorrelated before the final re-normalisation
    y = w.apply(x[:200], normalize=False)
    assert np.allclose(np.cov(y.T, bias=True), np.eye(8), atol=1e-3)


def test_apply_truncated_dim_to_single_file_and_split_files(emb_file, tmp_path):
    path, x, _, _ = emb_file
    npz = tmp_path / "w.npz"
    assert main(["--embeddings", str(path), "--dim", "16", "--out", str(npz)]) == 0
    one = tmp_path / "w4.parquet"
    assert main(["--apply", str(npz), "--dim", "4", "--embeddings", str(path),
                 "--out", str(one)]) == 0
    got = read_vectors(str(one))
    assert got.meta.dim == 4 and got.meta.model == "m1+pcaw4"
    assert np.allclose(got.vectors, load_whitening(str(npz)).truncate(4).apply(x), atol=1e-6)
    parts = tmp_path / "parts"
    assert main(["--apply", str(npz), "--embeddings", str(path), "--out", str(parts),
                 "--rows-per-file", "100", "--batch-size", "64"]) == 0
    names = sorted(p.name for p in parts.iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(parts / n).num_rows for n in names] == [100, 100, 40]
    assert len(read_vectors(str(parts))) == 240


def test_split_all_and_centroids_keep_their_columns(emb_file, tmp_path):
    path, x, _, _ = emb_file
    npz = tmp_path / "all.npz"
    assert main(["--embeddings", str(path), "--dim", "6", "--split", "all",
                 "--out", str(npz)]) == 0
    assert load_whitening(str(npz)).n_samples == 240
    cpath = tmp_path / "cent.parquet"
    cams = [[1, 2]] * 10
    write_table_atomic(make_centroids_table([str(i) for i in range(10)], x[:10], [3] * 10, cams,
                                            "m1"), str(cpath))
    out = tmp_path / "cent_w.parquet"
    assert main(["--apply", str(npz), "--embeddings", str(cpath), "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert t.column_names == ["item_id", "embedding", "count", "camera_ids"]
    assert t.column("count").to_pylist() == [3] * 10 and t.column("camera_ids").to_pylist() == cams
    assert read_vectors(str(out)).meta.model == "m1+pcaw6"


def test_bad_input_one_line_error_exit_2_and_old_output_kept(emb_file, tmp_path):
    path, _, _, _ = emb_file
    r = run_whiten("--embeddings", tmp_path / "missing", "--dim", 8, "--out", tmp_path / "w.npz")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "missing" in r.stderr
    r = run_whiten("--embeddings", path, "--dim", 25, "--out", tmp_path / "w.npz")
    assert r.returncode == 2 and "1..24" in r.stderr
    assert not (tmp_path / "w.npz").exists()

    npz = tmp_path / "w.npz"
    assert main(["--embeddings", str(path), "--dim", "8", "--out", str(npz)]) == 0
    out = tmp_path / "out"
    assert main(["--apply", str(npz), "--embeddings", str(path), "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    other = tmp_path / "other.parquet"   # same dimension, another model
    write_table_atomic(make_embeddings_table(["a", "b"], ["1", "2"], [0, 0], ["query"] * 2,
                                             vectors(2), "m2"), str(other))
    with pytest.raises(WhiteningError, match="fitted on model 'm1'"):
        main(["--apply", str(npz), "--embeddings", str(other), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

    with pytest.raises(ValueError, match="needs --dim"):
        main(["--embeddings", str(path), "--out", str(npz)])
    with pytest.raises(ValueError, match=".npz"):
        main(["--embeddings", str(path), "--dim", "4", "--out", str(tmp_path / "w.bin")])
    with pytest.raises(WhiteningError, match="no vectors of split 'train'"):
        main(["--embeddings", str(path), "--dim", "4", "--split", "train",
              "--out", str(npz)])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(WhiteningError, match="not a whitening"):
        main(["--apply", str(bad), "--embeddings", str(path), "--out", str(out)])
    with pytest.raises(WhiteningError, match="output dimension"):
        main(["--apply", str(npz), "--dim", "9", "--embeddings", str(path), "--out", str(out)])


def test_help_documents_every_option():
    r = run_whiten("--help")
    assert r.returncode == 0
    for opt in ("--embeddings", "--apply", "--dim", "--out", "--split", "--power", "--shrinkage",
                "--batch-size", "--rows-per-file"):
        assert opt in r.stdout


def test_whitened_index_whitens_raw_queries(emb_file, tmp_path, capsys):
    """build_index --whiten stores the whitening with the version; query.py then takes queries
    of the original model and answers as a search of their whitened vectors."""
    from contracts.results import read_results
    from index.ann.search import open_index
    from pipelines import build_index as build_cli
    from pipelines import query as query_cli
    from pipelines._cli import run_main

    path, x, ids, items = emb_file
    npz = tmp_path / "pcaw16.npz"
    assert run_whiten("--embeddings", path, "--dim", 16, "--out", npz).returncode == 0
    gallery = tmp_path / "gallery.parquet"
    queries = tmp_path / "queries.parquet"
    write_table_atomic(make_embeddings_table(ids[:200], items[:200], [1] * 200, ["gallery"] * 200,
                                             x[:200], "m1"), str(gallery))
    write_table_atomic(make_embeddings_table(ids[200:], items[200:], [2] * 40, ["query"] * 40,
                                             x[200:], "m1"), str(queries))
    with pytest.raises(SystemExit) as e:
        run_main(build_cli.main, ["--vectors", str(gallery), "--root", str(tmp_path / "idx"), "--name", "g",
                                  "--shards", "2", "--index-type", "flat", "--whiten", str(npz),
                                  "--whiten-dim", "8"])
    assert e.value.code == 0, capsys.readouterr().err
    idx = open_index(str(tmp_path / "idx" / "g"), verify=True)  # the .npz is hashed too
    assert idx.dim == 8 and idx.model == "m1+pcaw8" and idx.input_model == "m1"
    assert "whitening.npz" in idx.manifest["files"]
    w = load_whitening(str(npz)).truncate(8)
    want = w.apply(x[200:]) @ w.apply(x[:200]).T                 # exact search, whitened space
    hits = idx.search(x[200:], 5, model="m1")
    assert np.allclose(hits.scores, -np.sort(-want, axis=1)[:, :5], atol=1e-5)
    idx.close()
    for extra in ([], ["--rerank", "aqe", "--qe-n", "2"]):
        out = tmp_path / ("res" + "".join(extra))
        with pytest.raises(SystemExit) as e:
            run_main(query_cli.main, ["--index", str(tmp_path / "idx" / "g"), "--queries", str(queries),
                                      "--k", "5", "--out", str(out), *extra])
        assert e.value.code == 0, capsys.readouterr().err
        res = read_results(str(out))
        top1 = res.filter(pa_equal(res.column("rank"), 0))
        if not extra:
            assert np.allclose(top1.column("score").to_numpy(), want.max(axis=1), atol=1e-5)
    # a query file of another model is refused in one line
    other = tmp_path / "other.parquet"
    write_table_atomic(make_embeddings_table(ids[200:], items[200:], [2] * 40, ["query"] * 40,
                                             x[200:], "m2"), str(other))
    with pytest.raises(SystemExit) as e:
        run_main(query_cli.main, ["--index", str(tmp_path / "idx" / "g"), "--queries", str(other),
                                  "--k", "5", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "m2" in err and "Traceback" not in err


def pa_equal(col, value):
    import pyarrow.compute as pc

    return pc.equal(col, value)


def test_build_refuses_a_whitening_of_another_dimension(emb_file, tmp_path, capsys):
    from pipelines import build_index as build_cli
    from pipelines._cli import run_main

    path, x, ids, items = emb_file
    npz = tmp_path / "pcaw8.npz"
    assert run_whiten("--embeddings", path, "--dim", 8, "--out", npz).returncode == 0
    other = tmp_path / "g12.parquet"
    write_table_atomic(make_embeddings_table(ids, items, [1] * 240, ["gallery"] * 240,
                                             l2_normalize(x[:, :12]), "m1"), str(other))
    with pytest.raises(SystemExit) as e:
        run_main(build_cli.main, ["--vectors", str(other), "--root", str(tmp_path / "idx"), "--name", "g",
                                  "--whiten", str(npz)])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "24-D" in err and not (tmp_path / "idx" / "g" / "CURRENT").exists()
