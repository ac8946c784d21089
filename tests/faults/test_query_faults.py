"""Query answering and index building at their limits (issue 14, cases 2, 8, 13, 16): many more
queries than gallery vectors through every re-ranking, duplicate ids at every reader, k beyond
the index, tiny approximate indexes, streamed queries, recall recorded without eval queries.
In-process, no Ray."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.parts import DUPLICATE_REASON, DuplicateFilter
from contracts.results import read_results
from contracts.vectors import l2_normalize, make_embeddings_table, write_table_atomic
from index.ann.build import BuildConfig, build_index
from index.ann.search import open_index
from index.rerank.chain import RerankConfig, rerank
from index.rerank.neighbours import flat_search_fn
from pipelines import build_index as build_job
from pipelines import evaluate as evaluate_job
from pipelines import query as query_job
from tests.faults.test_bad_vectors import assert_one_line_error, cli
from tests.index.index_data import clustered, write_vectors

DIM = 16
N_GALLERY = 146
N_QUERIES = 2000

METHODS = ["kreciprocal", "aqe", "alpha-qe", "dba", "diffusion", "dba,aqe,kreciprocal",
           "dba,alpha-qe,diffusion", "dba,kreciprocal"]


def crowded(n_query=N_QUERIES, n_gallery=N_GALLERY, seed=0):
    """Gallery around 20 item centres; queries packed tightly around 5 other centres, so a
    query's nearest points in queries + gallery are all other queries (the case that emptied
    k-reciprocal's lists)."""
    rng = np.random.default_rng(seed)
    g_centres, q_centres = rng.normal(size=(20, DIM)), rng.normal(size=(5, DIM))
    g = l2_normalize(g_centres[rng.integers(0, 20, n_gallery)] + 0.3 * rng.normal(size=(n_gallery, DIM)))
    q = l2_normalize(q_centres[rng.integers(0, 5, n_query)] + 0.1 * rng.normal(size=(n_query, DIM)))
    return q, g


def write_queries(path, q, prefix="q"):
    n = len(q)
    write_table_atomic(make_embeddings_table([f"{prefix}{i:06d}.jpg" for i in range(n)], ["x"] * n, [1] * n,
                                             ["query"] * n, q, "m1"), str(path))
    return path


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crowd")
    q, g = crowded()
    write_vectors(tmp / "gallery.parquet", g)
    build_index(str(tmp / "gallery.parquet"), str(tmp / "idx"), "g", BuildConfig(shards=2, index_type="flat"))
    write_queries(tmp / "queries.parquet", q)
    return tmp, q, g


def assert_full_lists(ids, want):
    assert ids.shape[1] >= want
    ok = ids[:, :want] >= 0
    assert ok.all(), f"{int((~ok.all(axis=1)).sum())} of {len(ids)} queries got fewer than {want} results"
    assert (ids[:, want:] < 0).all()
    srt = np.sort(ids[:, :want], axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all()  # no gallery row twice in a list


# ---------------------------------------------------------------- 2: re-ranking dropped results
@pytest.mark.parametrize("methods", METHODS)
def test_every_reranking_fills_every_list_when_queries_outnumber_the_gallery(crowd, methods):
    """2,000 crowded queries vs 146 gallery vectors: min(k, G) results for every query, from the
    library's exact searches, from a gallery search (the index's path) and with junk left out.
    Before: k-reciprocal left 1,678 of 200,000 slots filled (the query's union neighbours were
    all queries, so it had no gallery candidates)."""
    _, q, g = crowd
    names = tuple(methods.split(","))
    for topk in (100, 500):  # below and above the gallery size
        want = min(topk, len(g))
        config = RerankConfig(methods=names, topk=topk)
        assert_full_lists(rerank(q, g, config).ids, want)
        assert_full_lists(rerank(q, g, config, search=flat_search_fn(g)).ids, want)
    keep = np.arange(len(g)) % 7 != 0
    res = rerank(q, g, RerankConfig(methods=names, topk=100), keep, search=flat_search_fn(g))
    assert_full_lists(res.ids, 100)
    assert keep[res.ids].all()


@pytest.mark.parametrize("methods", ["none", "kreciprocal", "aqe", "dba", "diffusion", "dba,alpha-qe,kreciprocal"])
def test_query_job_writes_every_row_with_every_reranking(crowd, tmp_path, capsys, methods):
    """Through query.py: `wrote 2000 x min(k, 146) rows`; before, `--rerank kreciprocal` wrote
    0 rows for 2,000 queries."""
    tmp, _, _ = crowd
    code, out, err = cli(query_job, ["--index", tmp / "idx" / "g", "--queries", tmp / "queries.parquet",
                                     "--k", 100, "--rerank", methods, "--batch-size", 512,
                                     "--out", tmp_path / "res"], capsys)
    assert code == 0, err
    t = read_results(str(tmp_path / "res"))
    assert t.num_rows == N_QUERIES * 100, out
    assert f"wrote {N_QUERIES * 100} rows for {N_QUERIES} queries" in out
    counts = pa.compute.value_counts(t.column("query_id"))
    assert len(counts) == N_QUERIES and set(counts.field("counts").to_pylist()) == {100}


# ---------------------------------------------------------------- 13: k, tiny indexes, memory
def test_huge_k_is_capped_with_a_note(crowd, tmp_path, capsys):
    """--k 10,000,000 on 146 vectors: every vector once per query and a printed note (before:
    5.7 GB allocated, then a traceback)."""
    tmp, _, _ = crowd
    write_queries(tmp_path / "few.parquet", crowded(20)[0])
    for rerank_name in ("none", "kreciprocal", "dba,aqe"):
        out_dir = tmp_path / f"res-{rerank_name}"
        code, out, err = cli(query_job, ["--index", tmp / "idx" / "g", "--queries", tmp_path / "few.parquet",
                                         "--k", 10_000_000, "--rerank", rerank_name, "--out", out_dir], capsys)
        assert code == 0, err
        assert "note: --k 10000000 is more than the 146 vectors" in out
        assert read_results(str(out_dir)).num_rows == 20 * N_GALLERY


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
@pytest.mark.parametrize("n", [1, 2, 146, 1000])
def test_tiny_approximate_index_builds_and_answers(tmp_path, index_type, n):
    """hnsw / ivf on <= 1,000 vectors: before, every vector was held back as an evaluation query,
    the shards were empty while tuning and the build failed (`merge_topk: no shard results`)."""
    write_vectors(tmp_path / "v.parquet", clustered(n, DIM, seed=1))
    res = build_index(str(tmp_path / "v.parquet"), str(tmp_path / "idx"), "t",
                      BuildConfig(shards=2, index_type=index_type))
    with open_index(str(tmp_path / "idx" / "t")) as idx:
        hits = idx.search(clustered(5, DIM, seed=2), 10)
    assert hits.valid.all() and hits.ids.shape == (5, min(10, n))
    rec = res.manifest["recall"]
    assert rec["eval_queries"] == n // 2 and (rec.get("recall@10") is None) == (n < 2)


def test_ivfpq_or_too_many_lists_on_a_tiny_set_is_one_line(tmp_path, capsys):
    write_vectors(tmp_path / "v.parquet", clustered(146, DIM, seed=1))
    for index_type, needle in (("ivfpq", "PQ codes need at least 256 training vectors"),
                               ("IVF1024,Flat", "1024 inverted lists but only 146 vectors")):
        code, _, err = cli(build_job, ["--vectors", tmp_path / "v.parquet", "--root", tmp_path / "r",
                                       "--name", "n", "--index-type", index_type], capsys)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "r" / "n" / "CURRENT").exists()


def test_streamed_queries_give_the_same_results_at_any_batch_size(crowd, tmp_path, capsys):
    """Queries are streamed (memory follows --batch-size, see benchmarks/query_memory.py): a file
    written as one row group answered in batches of 7 or 4,096 gives identical results, with or
    without a re-ranking that treats queries one by one."""
    tmp, q, _ = crowd
    big = tmp_path / "one_row_group.parquet"
    pq.write_table(pq.read_table(tmp / "queries.parquet"), big, row_group_size=1 << 20)
    for rerank_name in ("none", "dba,alpha-qe", "diffusion"):
        tables = []
        for batch in (7, 4096):
            out_dir = tmp_path / f"r{batch}-{rerank_name}"
            code, _out, err = cli(query_job, ["--index", tmp / "idx" / "g", "--queries", big, "--k", 5,
                                             "--rerank", rerank_name, "--batch-size", batch, "--out", out_dir], capsys)
            assert code == 0, err
            tables.append(read_results(str(out_dir)))
        assert tables[0].num_rows == len(q) * 5 and tables[0].equals(tables[1])


# ---------------------------------------------------------------- 16: recall without eval queries
def test_manifest_recall_is_measured_never_assumed(tmp_path, capsys):
    """Before: a Flat build recorded `recall@10: 1.0` with `eval_queries: 0`. Now every recorded
    recall@10 was measured on held-back queries (Flat too), and --eval-queries 0 is refused."""
    write_vectors(tmp_path / "v.parquet", clustered(300, DIM, seed=1))
    res = build_index(str(tmp_path / "v.parquet"), str(tmp_path / "idx"), "f", BuildConfig(index_type="flat"))
    rec = res.manifest["recall"]
    assert rec["eval_queries"] == 150 and rec["recall@10"] == pytest.approx(1.0) and rec["target_met"]
    code, _, err = cli(build_job, ["--vectors", tmp_path / "v.parquet", "--root", tmp_path / "idx", "--name", "z",
                                   "--eval-queries", 0], capsys)
    assert_one_line_error(code, err, "eval_queries must be >= 1")
    write_vectors(tmp_path / "one.parquet", clustered(1, DIM, seed=1))
    one = build_index(str(tmp_path / "one.parquet"), str(tmp_path / "idx"), "one", BuildConfig()).manifest
    assert one["recall"]["eval_queries"] == 0 and "recall@10" not in one["recall"]
    on_disk = json.loads((tmp_path / "idx" / "one" / one["version"] / "manifest.json").read_text())
    assert "recall@10" not in on_disk["recall"]


# ---------------------------------------------------------------- 8: duplicate ids
def doubled(tmp_path, g):
    """Two copies of one embeddings file in a directory (two copies of a shard, embedded)."""
    d = tmp_path / "two_copies"
    d.mkdir()
    write_vectors(d / "a.parquet", g)
    write_vectors(d / "b.parquet", g)
    return d


def test_duplicate_image_ids_are_refused_by_build_query_and_evaluate(crowd, tmp_path, capsys):
    """292 rows for 146 image ids: before, build_index indexed both copies (each answer twice),
    query answered each query twice and evaluate counted both (mAP shifted)."""
    tmp, _, g = crowd
    d = doubled(tmp_path, g)
    code, _, err = cli(build_job, ["--vectors", d, "--root", tmp_path / "r", "--name", "n"], capsys)
    assert_one_line_error(code, err, "image_id 'img000000.jpg' appears 2 times", "146 duplicated")
    assert not (tmp_path / "r" / "n").exists() or not (tmp_path / "r" / "n" / "CURRENT").exists()
    for rerank_name in ("none", "kreciprocal", "aqe"):
        code, _, err = cli(query_job, ["--index", tmp / "idx" / "g", "--queries", d, "--k", 3,
                                       "--rerank", rerank_name, "--out", tmp_path / "o"], capsys)
        assert_one_line_error(code, err, "appears 2 times")
    assert not (tmp_path / "o").exists()
    for q, gal in ((d, tmp / "gallery.parquet"), (tmp / "gallery.parquet", d)):
        code, _, err = cli(evaluate_job, ["--query", q, "--gallery", gal, "--out", tmp_path / "r.json"], capsys)
        assert_one_line_error(code, err, "appears 2 times")
    assert not (tmp_path / "r.json").exists()


def test_duplicate_item_ids_in_centroids_are_refused(tmp_path, capsys):
    d = tmp_path / "cents"
    d.mkdir()
    write_vectors(d / "a.parquet", clustered(10, DIM), kind="centroids")
    write_vectors(d / "b.parquet", clustered(10, DIM, seed=5), kind="centroids")
    code, _, err = cli(build_job, ["--vectors", d, "--root", tmp_path / "r", "--name", "n"], capsys)
    assert_one_line_error(code, err, "item_id 'item0' appears 2 times")


def test_embed_keeps_the_first_copy_and_lists_the_second_as_an_error():
    """embed's writer filter (every row the job writes goes through it): the second row of an
    image_id, in the same batch or a later one, is an error row, never written."""
    first = DuplicateFilter()
    kept, errs = first(pa.table({"image_id": ["a", "b", "a"], "v": [1, 2, 3]}))
    assert kept.column("image_id").to_pylist() == ["a", "b"] and kept.column("v").to_pylist() == [1, 2]
    assert errs.column("image_id").to_pylist() == ["a"] and errs.column("reason")[0].as_py() == DUPLICATE_REASON
    kept, errs = first(pa.table({"image_id": ["b", "c"], "v": [4, 5]}))
    assert kept.column("image_id").to_pylist() == ["c"] and errs.column("image_id").to_pylist() == ["b"]
