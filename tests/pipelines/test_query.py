import numpy as np
import pytest

from contracts.results import read_ranked_lists, read_results, results_metadata
from index.ann.build import BuildConfig, build_index
from index.ann.search import exact_search
from pipelines import query
from pipelines._cli import run_main
from tests.index.index_data import clustered, write_vectors


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(query.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q")
    x = clustered(800, 16, seed=1)
    labels = write_vectors(tmp / "gallery.parquet", x)
    build_index(str(tmp / "gallery.parquet"), str(tmp / "idx"), "g", BuildConfig(shards=3, index_type="flat"))
    q = clustered(50, 16, seed=2)
    write_vectors(tmp / "queries.parquet", q, prefix="q")
    return tmp, x, q, labels


def test_query_writes_results_contract(setup, capsys):
    tmp, x, q, labels = setup
    code, _, err = run_cli(["--index", str(tmp / "idx" / "g"), "--queries", str(tmp / "queries.parquet"),
                              "--k", "7", "--out", str(tmp / "res"), "--batch-size", "16"], capsys)
    assert code == 0, err
    t = read_results(str(tmp / "res"))
    assert t.num_rows == 50 * 7
    rl = read_ranked_lists(str(tmp / "res"), query_ids=[f"q{i:06d}.jpg" for i in range(50)])
    ref_s, ref_i = exact_search(q, x, 7)
    np.testing.assert_allclose(rl.scores, ref_s, atol=1e-5)
    same = rl.image_ids == labels["image_ids"][ref_i]
    assert same.mean() > 0.98  # only float near-ties may swap
    np.testing.assert_array_equal(rl.item_ids[same], labels["item_ids"][ref_i][same])
    meta = results_metadata(str(tmp / "res"))
    assert meta["k"] == 7 and meta["mode"] == "instance" and meta["rerank"] is None


def test_query_errors_are_one_line(setup, capsys, tmp_path):
    tmp, *_ = setup
    write_vectors(tmp_path / "q8.parquet", clustered(5, 8))
    write_vectors(tmp_path / "other.parquet", clustered(5, 16), model="other")
    cases = [(tmp_path / "q8.parquet", "dimension 8 does not match index dimension 16"),
             (tmp_path / "other.parquet", "model"),
             (tmp_path / "none.parquet", "no such file")]
    for qpath, expect in cases:
        code, _, err = run_cli(["--index", str(tmp / "idx" / "g"), "--queries", str(qpath), "--k", "3",
                                "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and err.startswith("error: ") and expect in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_query_on_ray_matches_local(setup, capsys, ray_local):
    tmp, *_ = setup
    base = ["--index", str(tmp / "idx" / "g"), "--queries", str(tmp / "queries.parquet"), "--k", "5"]
    assert run_cli(base + ["--out", str(tmp / "local")], capsys)[0] == 0
    assert run_cli(base + ["--out", str(tmp / "ray"), "--ray"], capsys)[0] == 0
    assert read_results(str(tmp / "local")).equals(read_results(str(tmp / "ray")))
