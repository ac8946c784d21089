import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from index.ann.build import BuildConfig, build_index
from index.ann.search import IndexMismatchError, exact_search, merge_topk, open_index, topk_rows
from index.ann.versions import IndexHome, IndexVersionError, finalize_manifest, shard_files
from tests.index.index_data import assert_same_ranking, clustered, write_vectors


def test_topk_rows_matches_full_sort_with_ties_and_padding():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(20, 30)).astype(np.float32)  # many exact ties
    ids = rng.permutation(600).reshape(20, 30).astype(np.int64)
    ids[0, :25] = -1  # padding slots
    s, i = topk_rows(scores, ids, 8)
    for r in range(20):
        cand = [(-scores[r, c], ids[r, c]) for c in range(30) if ids[r, c] >= 0]
        ref = sorted(cand)[:8]
        assert i[r, : len(ref)].tolist() == [c[1] for c in ref]
        assert s[r, : len(ref)].tolist() == [-c[0] for c in ref]
        assert (i[r, len(ref):] == -1).all() and np.isneginf(s[r, len(ref):]).all()


def test_merge_topk_of_shards_equals_global_topk():
    rng = np.random.default_rng(1)
    scores = rng.random((10, 100)).astype(np.float32)
    ids = np.tile(np.arange(100), (10, 1))
    parts = []
    for shard in range(4):
        cols = np.arange(shard, 100, 4)
        parts.append(topk_rows(scores[:, cols], ids[:, cols], 5))
    ms, mi = merge_topk(parts, 5)
    gs, gi = topk_rows(scores, ids, 5)
    np.testing.assert_array_equal(mi, gi)
    np.testing.assert_array_equal(ms, gs)


@pytest.fixture(scope="module")
def flat_indexes(tmp_path_factory):
    """The same 3000 x 32 vectors as a 1-shard and a 4-shard Flat index."""
    tmp = tmp_path_factory.mktemp("flat")
    x = clustered(3000, 32, seed=5, clusters=30)
    labels = write_vectors(tmp / "v.parquet", x)
    for shards in (1, 4):
        build_index(str(tmp / "v.parquet"), str(tmp), f"s{shards}",
                    BuildConfig(shards=shards, index_type="flat", batch_size=700))
    q = clustered(64, 32, seed=6, clusters=30)
    return tmp, x, q, labels


def test_flat_equals_brute_force_for_1_and_4_shards(flat_indexes):
    tmp, x, q, labels = flat_indexes
    ref_s, ref_i = exact_search(q, x, 20)
    got = {}
    for shards in (1, 4):
        with open_index(str(tmp / f"s{shards}")) as idx:
            assert idx.num_shards == shards and len(idx) == 3000
            hits = idx.search(q, 20)
        assert_same_ranking(hits.scores, hits.ids, ref_s, ref_i)
        np.testing.assert_array_equal(hits.item_ids, labels["item_ids"][hits.ids])
        np.testing.assert_array_equal(hits.image_ids, labels["image_ids"][hits.ids])
        got[shards] = hits
    assert_same_ranking(got[4].scores, got[4].ids, got[1].scores, got[1].ids)


def test_k_larger_than_index_is_capped(tmp_path):
    """k beyond the index size answers every vector and allocates no padding (k = 10^7 on a
    146-vector index used to take 5.7 GB, then a traceback)."""
    x = clustered(7, 8)
    write_vectors(tmp_path / "v.parquet", x, kind="centroids")
    build_index(str(tmp_path / "v.parquet"), str(tmp_path), "tiny", BuildConfig(shards=3, index_type="flat"))
    with open_index(str(tmp_path / "tiny")) as idx:
        for k in (10, 10_000_000):
            hits = idx.search(x[:2], k)
            assert hits.ids.shape == (2, 7) and hits.valid.all()
            assert hits.image_ids is None and None not in hits.item_ids
            assert sorted(hits.ids[0]) == list(range(7))
    # closed (query.py closes it before re-ranking with a stored graph): the ids tables still
    # answer, a search is a clear error rather than empty lists
    items, _ = idx.lookup(np.arange(7))
    assert None not in items.tolist() and len(idx) == 7
    with pytest.raises(RuntimeError, match="index was closed"):
        idx.search(x[:2], 3)


def test_query_mismatch_errors(flat_indexes):
    tmp, _, q, _ = flat_indexes
    with open_index(str(tmp / "s1")) as idx:
        with pytest.raises(IndexMismatchError, match="dimension 16 does not match index dimension 32"):
            idx.search(q[:, :16], 5)
        bad = q.copy()
        bad[1, 0] = np.nan
        with pytest.raises(IndexMismatchError, match="NaN"):
            idx.search(bad, 5)
        with pytest.raises(IndexMismatchError, match="model"):
            idx.search(q, 5, model="other-model")
        assert idx.search(q[:0], 5).ids.shape == (0, 5)


def test_tampered_shard_refused_with_verify(tmp_path):
    x = clustered(300, 8)
    write_vectors(tmp_path / "v.parquet", x)
    res = build_index(str(tmp_path / "v.parquet"), str(tmp_path), "t", BuildConfig(shards=2, index_type="flat"))
    path = os.path.join(res.path, shard_files(1)[0])
    data = bytearray(Path(path).read_bytes())
    data[-5] ^= 0xFF  # flip bits inside a stored vector; the size stays the same
    Path(path).write_bytes(bytes(data))
    with pytest.raises(IndexVersionError, match="sha256"):
        open_index(str(tmp_path / "t"), verify=True)
    open_index(str(tmp_path / "t"), verify=False).close()  # without verify it loads (silently wrong)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexVersionError, match="no such index"):
        open_index(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexVersionError, match="no published version"):
        open_index(str(tmp_path / "empty"))


def _copy_version(home: IndexHome, src_version: str) -> str:
    """A new version with the same files (as a nightly rebuild would write), not yet published."""
    src = home.version_dir(src_version)
    man = home.manifest(src_version)
    with home.new_version() as (ver, tmp):
        for name in man["files"]:
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
        finalize_manifest(tmp, {k: v for k, v in man.items() if k not in ("files", "created_at")} | {"version": ver})
    return ver


def test_readers_never_see_a_partial_version_while_publishing(tmp_path):
    # two different datasets: whichever version a reader opens, its results must be exactly
    # that dataset's brute force answer
    xa, xb = clustered(400, 16, seed=10), clustered(700, 16, seed=11)
    write_vectors(tmp_path / "a.parquet", xa)
    write_vectors(tmp_path / "b.parquet", xb)
    ra = build_index(str(tmp_path / "a.parquet"), str(tmp_path), "live", BuildConfig(shards=2, index_type="flat"))
    rb = build_index(str(tmp_path / "b.parquet"), str(tmp_path), "live", BuildConfig(shards=3, index_type="flat"),
                     publish=False)
    home = IndexHome.of(tmp_path, "live")
    q = clustered(8, 16, seed=12)
    ref = {400: exact_search(q, xa, 5), 700: exact_search(q, xb, 5)}
    stop = threading.Event()
    errors, opened = [], []

    def publisher():
        versions = [ra.version, rb.version]
        i = 0
        while not stop.is_set():
            i += 1
            if i % 5 == 0:  # write brand-new versions too (temp dir -> rename -> CURRENT), then prune
                versions.append(_copy_version(home, versions[i % 2]))
                home.publish(versions[-1])
                home.prune(keep=4)
                versions = [v for v in versions if v in home.list_versions()]
            else:
                home.publish(versions[i % len(versions)])

    def reader():
        while not stop.is_set():
            try:
                with open_index(str(tmp_path / "live")) as idx:
                    hits = idx.search(q, 5, labels=True)
                    n = idx.manifest["num_vectors"]
                    opened.append(idx.version)
                    assert len(idx) == n and idx.ntotal == n
                    assert_same_ranking(hits.scores, hits.ids, *ref[n])
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    threads = [threading.Thread(target=publisher)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    threading.Event().wait(4.0)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(opened) >= 5 and len(set(opened)) >= 2


def test_reader_keeps_working_after_its_version_is_pruned(tmp_path):
    x = clustered(200, 8)
    write_vectors(tmp_path / "v.parquet", x)
    old = build_index(str(tmp_path / "v.parquet"), str(tmp_path), "p", BuildConfig(index_type="flat"))
    idx = open_index(str(tmp_path / "p"))
    before = idx.search(x[:4], 3)
    build_index(str(tmp_path / "v.parquet"), str(tmp_path), "p", BuildConfig(index_type="flat"))
    assert IndexHome.of(tmp_path, "p").prune(keep=1) == [old.version]
    after = idx.search(x[:4], 3)
    np.testing.assert_array_equal(before.ids, after.ids)
    idx.close()


@pytest.mark.slow
def test_ray_execution_equals_in_process(flat_indexes, ray_local):
    tmp, x, q, _ = flat_indexes
    with open_index(str(tmp / "s4")) as local, open_index(str(tmp / "s4"), executor="ray", verify=True) as remote:
        a, b = local.search(q, 20), remote.search(q, 20)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    ref_s, ref_i = exact_search(q, x, 20)
    assert_same_ranking(b.scores, b.ids, ref_s, ref_i)
