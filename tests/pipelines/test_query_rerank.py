"""query.py --rerank: re-ranking from the sharded index's neighbour lists."""
import numpy as np
import pytest

from contracts.results import read_ranked_lists, read_results, results_metadata
from contracts.vectors import l2_normalize, make_embeddings_table, write_table_atomic
from index.ann.build import BuildConfig, build_index
from index.ann.search import open_index
from index.rerank.backends import load_index_vectors
from index.rerank.chain import RerankConfig, rerank
from index.rerank.expansion import query_expansion
from index.rerank.kreciprocal import k_reciprocal_from_embeddings
from index.rerank.neighbours import filtered_search_fn, rescored_search_fn
from pipelines import query
from pipelines._cli import run_main


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(query.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def reid_like(n_items=60, per_item=6, n_query_items=40, dim=24, seed=0, noise=0.6):
    """Identities = clusters with a spread; query: one image of each of the first items."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_items, dim))
    g_items = np.repeat(np.arange(n_items), per_item)
    g = l2_normalize(centres[g_items] + noise * rng.normal(size=(len(g_items), dim)))
    q_items = np.arange(n_query_items)
    q = l2_normalize(centres[q_items] + noise * rng.normal(size=(len(q_items), dim)))
    return q, q_items, g, g_items


def write(path, x, items, split, prefix):
    ids = [f"{prefix}{i:05d}.jpg" for i in range(len(x))]
    items = [("-1" if it < 0 else f"p{it}") for it in items]
    cams = [1 if split == "query" else 2] * len(x)  # other camera: every same-item image is a match
    write_table_atomic(make_embeddings_table(ids, items, cams, [split] * len(x), x, "m1"), str(path))
    return np.asarray(ids, object), np.asarray(items, object)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qr")
    q, qi, g, gi = reid_like()
    gi = gi.copy()
    gi[::17] = -1  # some junk
    g_ids, g_items = write(tmp / "gallery.parquet", g, gi, "gallery", "g")
    build_index(str(tmp / "gallery.parquet"), str(tmp / "idx"), "g", BuildConfig(shards=3, index_type="flat"))
    # queries and a few training rows in one file, to exercise --split
    both = np.concatenate([q, g[:5]])
    ids = [f"q{i:05d}.jpg" for i in range(len(both))]
    items = [f"p{i}" for i in qi] + ["p0"] * 5
    splits = ["query"] * len(q) + ["train"] * 5
    write_table_atomic(make_embeddings_table(ids, items, [1] * len(both), splits, both, "m1"),
                       str(tmp / "queries.parquet"))
    return tmp, q, qi, g, gi, g_ids, g_items


def ranked(tmp, out, n):
    return read_ranked_lists(str(tmp / out), query_ids=[f"q{i:05d}.jpg" for i in range(n)])


def mean_ap(rl, q_items, g_items_all):
    """mAP@k of the lists against all true matches (junk excluded)."""
    aps = []
    for row, it in enumerate(q_items):
        n_rel = int((g_items_all == f"p{it}").sum())
        hits = np.flatnonzero(rl.item_ids[row] == f"p{it}")
        aps.append(np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / n_rel if n_rel else 0.0)
    return float(np.mean(aps))


def test_rerank_none_equals_plain_results(setup, capsys):
    tmp, q, *_ = setup
    base = ["--index", str(tmp / "idx" / "g"), "--queries", str(tmp / "queries.parquet"), "--k", "10",
            "--split", "query"]
    assert run_cli(base + ["--out", str(tmp / "plain")], capsys)[0] == 0
    assert run_cli(base + ["--out", str(tmp / "none"), "--rerank", "none"], capsys)[0] == 0
    a, b = read_results(str(tmp / "plain")), read_results(str(tmp / "none"))
    assert a.equals(b) and a.num_rows == len(q) * 10  # the 5 train rows were left out by --split
    assert results_metadata(str(tmp / "none"))["rerank"] is None


def test_rerank_changes_lists_and_improves_map(setup, capsys):
    tmp, q, qi, g, gi, g_ids, g_items = setup
    base = ["--index", str(tmp / "idx" / "g"), "--queries", str(tmp / "queries.parquet"), "--k", "30",
            "--split", "query", "--batch-size", "16"]
    assert run_cli(base + ["--out", str(tmp / "r_none")], capsys)[0] == 0
    code, _, err = run_cli(base + ["--out", str(tmp / "r_kr"), "--rerank", "kreciprocal", "--k1", "8",
                                     "--k2", "3"], capsys)
    assert code == 0, err
    code, _, err = run_cli(base + ["--out", str(tmp / "r_combo"), "--rerank", "dba,alpha-qe,kreciprocal",
                                   "--k1", "8", "--k2", "3", "--qe-n", "3", "--dba-n", "3"], capsys)
    assert code == 0, err
    none, kr, combo = (ranked(tmp, name, len(q)) for name in ("r_none", "r_kr", "r_combo"))
    assert not np.array_equal(none.image_ids, kr.image_ids)
    assert "-1" not in set(kr.item_ids.ravel())  # junk takes no part
    assert mean_ap(kr, qi, g_items) > mean_ap(none, qi, g_items) + 0.01
    assert mean_ap(combo, qi, g_items) > mean_ap(none, qi, g_items) + 0.01
    assert np.all(np.diff(kr.scores, axis=1) <= 1e-6)  # higher is more similar, descending
    meta = results_metadata(str(tmp / "r_combo"))
    assert meta["rerank"] == "dba,alpha-qe,kreciprocal"
    assert meta["rerank_params"]["k1"] == 8 and meta["rerank_params"]["dba_n"] == 3
    assert meta["rerank_params"]["alpha"] == 3.0 and meta["split"] == "query"
    # the index-driven k-reciprocal lists equal the exact dense re-ranking's top of the list
    keep = gi >= 0
    dense = k_reciprocal_from_embeddings(q, g, 8, 3, 0.3, gallery_keep=keep)
    top = np.argsort(dense, axis=1, kind="stable")[:, :10]
    assert (g_ids[top] == kr.image_ids[:, :10]).mean() > 0.97


def test_bad_rerank_name_is_one_line_error(setup, capsys, tmp_path):
    tmp, *_ = setup
    code, _, err = run_cli(["--index", str(tmp / "idx" / "g"), "--queries", str(tmp / "queries.parquet"),
                            "--out", str(tmp_path / "o"), "--rerank", "kreciprocal,bogus"], capsys)
    assert code == 2 and err.startswith("error: ") and "bogus" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_changed_source_vectors_are_refused(setup, capsys, tmp_path):
    tmp, _, _, g, gi, *_ = setup
    write(tmp_path / "other.parquet", g[::-1].copy(), gi[::-1], "gallery", "g")
    code, _, err = run_cli(["--index", str(tmp / "idx" / "g"), "--queries", str(tmp / "queries.parquet"),
                            "--out", str(tmp_path / "o"), "--rerank", "aqe",
                            "--gallery-vectors", str(tmp_path / "other.parquet")], capsys)
    assert code == 2 and "do not match" in err and not (tmp_path / "o").exists()


def test_index_vectors_and_search_wrappers(setup):
    tmp, q, _, g, gi, *_ = setup
    with open_index(str(tmp / "idx" / "g")) as index:
        vecs = load_index_vectors(index)
        np.testing.assert_array_equal(vecs, g)

        def search(x, k):
            h = index.search(x, k, labels=False)
            return h.scores, h.ids

        keep = gi >= 0
        _, ids = filtered_search_fn(search, keep)(q, 50)
        rows = np.flatnonzero(keep)
        ref = np.argsort(-(q @ g[rows].T), axis=1, kind="stable")[:, :50]
        assert (ids == ref).mean() > 0.99 and ids.min() >= 0
        # re-scored search over other vectors with the same rows
        other = l2_normalize(g + 0.05)
        s2, _ = rescored_search_fn(search, other, factor=8)(q, 5)
        np.testing.assert_allclose(s2, np.sort(q @ other.T, axis=1)[:, ::-1][:, :5], atol=1e-5)
        # rerank over a search without k-reciprocal = exact AQE ranking over kept rows
        cfg = RerankConfig(methods=("aqe",), qe_n=3, topk=10)
        res = rerank(q, g, cfg, keep, search=search)
        assert np.all(keep[res.ids])
        expanded = query_expansion(q, g[keep], 3)
        ref = rows[np.argsort(-(expanded @ g[keep].T), axis=1, kind="stable")[:, :10]]
        assert (res.ids == ref).mean() > 0.99


def test_evaluate_results_reports_the_rerank_query_applied(setup, capsys, tmp_path):
    """evaluate.py --results scores query.py's lists and names the re-ranking they carry; the
    re-ranked lists score a higher mAP@k than the plain ones."""
    import json

    from pipelines import evaluate

    tmp, *_ = setup
    base = ["--index", str(tmp / "idx" / "g"), "--queries", str(tmp / "queries.parquet"), "--k", "30",
            "--split", "query"]
    reports = {}
    for method in ("none", "kreciprocal"):
        out = tmp_path / method
        assert run_cli(base + ["--out", str(out), "--rerank", method, "--k1", "8", "--k2", "3"], capsys)[0] == 0
        assert evaluate.main(["--results", str(out), "--query", str(tmp / "queries.parquet"),
                              "--query-split", "query", "--gallery-labels", str(tmp / "gallery.parquet"),
                              "--out", str(tmp_path / f"{method}.json")]) == 0
        reports[method] = json.loads((tmp_path / f"{method}.json").read_text())
    assert reports["none"]["rerank"] is None and reports["kreciprocal"]["rerank"] == "kreciprocal"
    assert reports["none"]["at_k"] == 30 and set(reports["none"]["cmc"]) == {"1", "5", "10", "20"}
    assert reports["kreciprocal"]["mAP"] > reports["none"]["mAP"]


def test_diffusion_from_the_index_improves_map(setup, capsys):
    tmp, q, qi, _g, _gi, _g_ids, g_items = setup
    base = ["--index", str(tmp / "idx" / "g"), "--queries", str(tmp / "queries.parquet"), "--k", "30",
            "--split", "query"]
    assert run_cli(base + ["--out", str(tmp / "d_none")], capsys)[0] == 0
    code, _, err = run_cli(base + ["--out", str(tmp / "d_dfs"), "--rerank", "dba,aqe,diffusion",
                                   "--diffusion-k", "5", "--diffusion-query-k", "3", "--qe-n", "2",
                                   "--dba-n", "2"], capsys)
    assert code == 0, err
    none, dfs = ranked(tmp, "d_none", len(q)), ranked(tmp, "d_dfs", len(q))
    assert "-1" not in set(dfs.item_ids.ravel())
    assert (dfs.image_ids != "").all()  # full lists: not-reached entries fill the tail
    assert np.all(np.diff(dfs.scores, axis=1) <= 1e-6)
    assert mean_ap(dfs, qi, g_items) > mean_ap(none, qi, g_items) + 0.01
    meta = results_metadata(str(tmp / "d_dfs"))
    assert meta["rerank"] == "dba,aqe,diffusion" and meta["rerank_params"]["diffusion_k"] == 5
    code, _, err = run_cli(base + ["--out", str(tmp / "d_bad"), "--rerank", "diffusion",
                                   "--diffusion-alpha", "1.0"], capsys)
    assert code != 0 and "--diffusion-alpha" in err and "Traceback" not in err


def test_stored_rerank_graph_gives_the_same_lists(setup, capsys, tmp_path):
    """build_index --rerank-graph: query.py merges the queries into the stored graph instead of
    searching the gallery again; with a flat index (junk present) the lists are the same."""
    tmp, *_ = setup
    build_index(str(tmp / "gallery.parquet"), str(tmp_path / "idx"), "g",
                BuildConfig(shards=3, index_type="flat", rerank_graph=24))
    with open_index(str(tmp_path / "idx" / "g")) as idx:
        assert idx.manifest["rerank_graph"]["k"] == 24 and "rerank-graph.npz" in idx.manifest["files"]
    args = ["--queries", str(tmp / "queries.parquet"), "--k", "20", "--split", "query",
            "--rerank", "kreciprocal", "--k1", "12", "--k2", "4"]
    code, plain_out, err = run_cli(["--index", str(tmp / "idx" / "g"), "--out", str(tmp_path / "plain")] + args, capsys)
    assert code == 0, err
    code, out, err = run_cli(["--index", str(tmp_path / "idx" / "g"), "--out", str(tmp_path / "graph")] + args, capsys)
    assert code == 0, err
    assert "using the version's rerank graph (24 neighbours" in out and "rerank graph" not in plain_out
    a, b = read_results(str(tmp_path / "plain")), read_results(str(tmp_path / "graph"))
    assert a.column("item_id").to_pylist() == b.column("item_id").to_pylist()
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-5)
    assert results_metadata(str(tmp_path / "graph"))["rerank_graph"] == 24
    # too few neighbours stored for k1: said, and the gallery is searched as before
    code, out, err = run_cli(["--index", str(tmp_path / "idx" / "g"), "--out", str(tmp_path / "k1")]
                             + args[:-4] + ["--k1", "30"], capsys)
    assert code == 0, err
    assert "not using the version's rerank graph (it keeps 24 neighbours per vector, k1 = 30 needs 31)" in out
