import hashlib
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from contracts.vectors import VectorFileError
from index.ann.build import (
    BuildConfig,
    IndexBuildError,
    build_index,
    choose_index_type,
    nlist_for,
    recall_at,
    shard_of,
)
from index.ann.search import exact_search, open_index
from index.ann.versions import IndexHome, shard_files, verify_files
from tests.index.index_data import clustered, write_vectors


def test_shard_of_is_stable_blake2b():
    items = [f"item{i}" for i in range(2000)]
    s = shard_of(items, 4)
    expected = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") % 4 for i in items]
    assert s.tolist() == expected
    counts = np.bincount(s, minlength=4)
    assert counts.min() > 400  # near-uniform
    assert shard_of(items, 1).tolist() == [0] * 2000


def test_choose_index_type_follows_size_and_memory():
    cfg = BuildConfig()
    assert choose_index_type(5_000, 128, 1, cfg) == "Flat"
    assert choose_index_type(50_000, 128, 1, cfg).startswith("HNSW")
    f = choose_index_type(1_000_000, 256, 1, cfg)
    nlist = int(f.split(",")[0][3:])
    assert f.endswith(",Flat") and 4 * math.sqrt(1e6) <= nlist <= 16 * math.sqrt(1e6)
    assert nlist & (nlist - 1) == 0
    # 4 shards of 1M: each shard has 250k vectors
    assert choose_index_type(1_000_000, 256, 4, cfg) == f"IVF{nlist_for(250_000)},Flat"
    # 1M x 256 float32 is ~1 GiB: a 0.2 GiB budget forces OPQ+IVF+PQ with codes that fit
    pq_type = choose_index_type(1_000_000, 256, 1, BuildConfig(max_memory_gb=0.2))
    assert pq_type.startswith("OPQ") and ",IVF" in pq_type and "PQ" in pq_type.split(",")[-1]
    m = int(pq_type.split(",")[-1][2:].rstrip("np"))
    assert 1_000_000 * (m + 8) <= 0.2 * 2**30
    with pytest.raises(IndexBuildError, match="fits"):
        choose_index_type(1_000_000, 256, 1, BuildConfig(max_memory_gb=0.001))
    assert choose_index_type(10, 8, 1, BuildConfig(index_type="IVF4,Flat")) == "IVF4,Flat"


def test_recall_at_excludes_self():
    exact = np.array([[7, 1, 2, 3]])
    assert recall_at(np.array([[7, 1, 2, 9]]), exact, np.array([7]), 3) == pytest.approx(2 / 3)
    assert recall_at(np.array([[1, 2, 3, 7]]), exact, np.array([7]), 3) == 1.0


def test_flat_build_layout_manifest_and_ids(tmp_path):
    x = clustered(900, 16, seed=1)
    labels = write_vectors(tmp_path / "vec" / "part-0.parquet", x)
    res = build_index(str(tmp_path / "vec"), str(tmp_path / "root"), "idx",
                      BuildConfig(shards=3, index_type="flat", batch_size=128))
    home = IndexHome.of(tmp_path / "root", "idx")
    assert home.current() == res.version
    m = home.manifest()
    assert m["version"] == res.version and m["model"] == "m1" and m["dim"] == 16
    assert m["metric"] == "inner_product" and m["index_type"] == "Flat" and m["num_shards"] == 3
    assert m["num_vectors"] == 900 and sum(m["shard_sizes"]) == 900
    assert m["source"] == [str(tmp_path / "vec")] and m["recall"]["recall@10"] == 1.0
    assert set(m["files"]) == {n for s in range(3) for n in shard_files(s)}
    verify_files(res.path, m)
    # every row in exactly one shard, all images of an item in the same shard, ids = row numbers
    seen = []
    for s in range(3):
        t = pq.read_table(os.path.join(res.path, shard_files(s)[1])).to_pydict()
        seen += t["id"]
        assert set(shard_of(t["item_id"], 3)) == {s}
        assert all(labels["item_ids"][i] == it and labels["image_ids"][i] == im
                   for i, it, im in zip(t["id"], t["item_id"], t["image_id"]))
    assert sorted(seen) == list(range(900))


def test_ivf_meets_recorded_recall(tmp_path):
    x = clustered(6000, 24, seed=2, clusters=40)
    write_vectors(tmp_path / "v.parquet", x)
    res = build_index(str(tmp_path / "v.parquet"), str(tmp_path), "ivf",
                      BuildConfig(shards=2, index_type="ivf", target_recall=0.9, eval_queries=300,
                                  batch_size=1000))
    m = res.manifest
    assert m["index_type"].startswith("IVF") and "nprobe" in m["search_params"]
    assert m["recall"]["recall@10"] >= 0.9 and m["recall"]["target_met"]
    # independent check on other held-out queries, through the published index as readers see it
    rng = np.random.default_rng(7)
    qi = rng.choice(len(x), 300, replace=False)
    with open_index(str(tmp_path / "ivf")) as idx:
        ivf = faiss_ivf(idx._backend.indexes[0])
        assert ivf.nprobe == m["search_params"]["nprobe"]
        got = idx.search(x[qi], 11, labels=False).ids
    _, exact = exact_search(x[qi], x, 11)
    assert recall_at(got, exact, qi, 10) >= m["recall"]["recall@10"] - 0.03


def faiss_ivf(index):
    import faiss

    return faiss.extract_index_ivf(index)


def test_hnsw_tunes_and_applies_ef_search(tmp_path):
    import faiss

    x = clustered(1500, 16, seed=3)
    write_vectors(tmp_path / "v.parquet", x, kind="centroids")
    res = build_index(str(tmp_path / "v.parquet"), str(tmp_path), "h",
                      BuildConfig(index_type="HNSW16", target_recall=0.99, eval_queries=200))
    ef = res.manifest["search_params"]["efSearch"]
    assert res.manifest["recall"]["recall@10"] >= 0.99 or ef == 4096
    assert res.manifest["has_image_ids"] is False
    with open_index(str(tmp_path / "h")) as idx:
        inner = faiss.downcast_index(idx._backend.indexes[0].index)
        assert inner.hnsw.efSearch == ef
        hits = idx.search(x[:5], 3)
        assert hits.image_ids is None and hits.item_ids[0, 0] == "item0"


def test_bad_inputs_leave_nothing(tmp_path):
    x = clustered(50, 8)
    x[3, 2] = np.nan
    import pyarrow as pa

    from contracts.vectors import embeddings_schema, embeddings_to_arrow, write_table_atomic

    schema = embeddings_schema(8, "m1")
    t = pa.table([pa.array([f"i{i}" for i in range(50)]), pa.array(["a"] * 50), pa.array([1] * 50, pa.int32()),
                  pa.array(["g"] * 50), embeddings_to_arrow(x)], schema=schema)
    write_table_atomic(t, str(tmp_path / "nan.parquet"))
    with pytest.raises(VectorFileError, match="NaN"):
        build_index(str(tmp_path / "nan.parquet"), str(tmp_path / "root"), "idx", BuildConfig(index_type="flat"))
    write_table_atomic(t.slice(0, 0), str(tmp_path / "empty.parquet"))
    with pytest.raises(IndexBuildError, match="no vectors"):
        build_index(str(tmp_path / "empty.parquet"), str(tmp_path / "root"), "idx")
    write_vectors(tmp_path / "ok.parquet", clustered(50, 8))
    with pytest.raises(IndexBuildError, match="bad index type"):
        build_index(str(tmp_path / "ok.parquet"), str(tmp_path / "root"), "idx", BuildConfig(index_type="Bogus7"))
    assert not (tmp_path / "root" / "idx").exists() or os.listdir(tmp_path / "root" / "idx") == []


def test_no_publish_keeps_current(tmp_path):
    write_vectors(tmp_path / "v.parquet", clustered(100, 8))
    first = build_index(str(tmp_path / "v.parquet"), str(tmp_path), "idx")
    second = build_index(str(tmp_path / "v.parquet"), str(tmp_path), "idx", publish=False)
    home = IndexHome.of(tmp_path, "idx")
    assert home.current() == first.version and home.list_versions() == [first.version, second.version]


@pytest.mark.skipif("__import__('faiss').get_num_gpus() == 0", reason="no GPU")
def test_gpu_build_matches_cpu_for_flat(tmp_path):
    x = clustered(500, 16)
    write_vectors(tmp_path / "v.parquet", x)
    build_index(str(tmp_path / "v.parquet"), str(tmp_path), "g", BuildConfig(index_type="flat", use_gpu=True))
    with open_index(str(tmp_path / "g"), use_gpu=True) as gi, open_index(str(tmp_path / "g"), use_gpu=False) as ci:
        a, b = gi.search(x[:20], 5), ci.search(x[:20], 5)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_pq_recall_plateau_is_recorded_honestly(tmp_path):
    # 4 x 4-bit codes cannot reach 0.99: tuning stops on the plateau and says the target is missed
    x = clustered(3000, 16, seed=4)
    write_vectors(tmp_path / "v.parquet", x)
    res = build_index(str(tmp_path / "v.parquet"), str(tmp_path), "pq",
                      BuildConfig(index_type="IVF16,PQ4x4np", target_recall=0.99, eval_queries=200))
    rec = res.manifest["recall"]
    assert not rec["target_met"] and rec["recall@10"] < 0.99
    nprobe = res.manifest["search_params"]["nprobe"]
    with open_index(str(tmp_path / "pq")) as idx:
        assert faiss_ivf(idx._backend.indexes[0]).nprobe == nprobe
        got = idx.search(x[:200], 11, labels=False).ids
    _, exact = exact_search(x[:200], x, 11)
    assert abs(recall_at(got, exact, np.arange(200), 10) - rec["recall@10"]) < 0.1


@pytest.mark.parametrize("kwargs, msg", [({"shards": 0}, "shards must be >= 1"),
                                         ({"eval_queries": 0}, "eval_queries must be >= 1"),
                                         ({"target_recall": 1.5}, "target recall"),
                                         ({"batch_size": 0}, "batch_size"),
                                         ({"max_memory_gb": 0.0}, "max_memory_gb"),
                                         ({"rerank_graph": -1}, "rerank_graph must be >= 0")])
def test_build_config_rejects_bad_values_on_construction(kwargs, msg):
    from index.ann.build import IndexBuildError

    with pytest.raises(IndexBuildError, match=msg):
        BuildConfig(**kwargs)
