"""Centroid aggregation (partial sums -> combine -> finalise) against a plain numpy reference."""
import numpy as np
import pyarrow as pa
import pytest

from contracts.vectors import VectorFileError
from index.centroids import aggregate as C


def data(n=600, d=16, items=40, cams=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    it = np.array([str(i) for i in rng.integers(0, items, n)], dtype=object)
    cam = rng.integers(1, cams + 1, n)
    return it, cam, x


def numpy_reference(it, cam, x):
    """Plain loops: per item mean then normalise; per (item, camera) sums."""
    out, pairs = {}, {}
    for i in sorted(set(it)):
        m = it == i
        mean = x[m].astype(np.float64).mean(0)
        out[i] = (mean / np.linalg.norm(mean), int(m.sum()), sorted({int(c) for c in cam[m] if c != -1}))
        for c in set(cam[m].tolist()):
            mm = m & (cam == c)
            pairs[(i, int(c))] = (x[mm].astype(np.float64).sum(0), int(mm.sum()))
    return out, pairs


@pytest.mark.parametrize("batch", [1, 37, 600])
def test_batched_equals_reference(batch):
    it, cam, x = data()
    parts = [C.partial_sums(it[s:s + batch], cam[s:s + batch], x[s:s + batch]) for s in range(0, len(x), batch)]
    rng = np.random.default_rng(1)
    parts = [parts[i] for i in rng.permutation(len(parts))]  # combine order does not matter
    pairs = C.combine(parts)
    c = C.finalize(pairs)
    ref, ref_pairs = numpy_reference(it, cam, x)
    assert list(c.item_ids) == sorted(ref)
    for k, i in enumerate(c.item_ids):
        e, n, cams = ref[i]
        assert np.abs(c.embeddings[k] - e).max() < 1e-5
        assert c.counts[k] == n and c.camera_ids[k] == cams
    assert c.embeddings.dtype == np.float32 and c.counts.dtype == np.int32
    assert len(pairs) == len(ref_pairs)
    for i, cm, s, n in zip(pairs.item_ids, pairs.camera_ids, pairs.sums, pairs.counts):
        rs, rn = ref_pairs[(i, int(cm))]
        assert n == rn and np.abs(s - rs).max() < 1e-5
    r = C.centroids_reference(it, cam, x)
    assert np.abs(r.embeddings - c.embeddings).max() < 1e-5


def test_unknown_cameras_and_none():
    it, cam, x = data(n=50)
    c = C.finalize(C.combine([C.partial_sums(it, None, x)]))
    assert all(cs == [] for cs in c.camera_ids)
    cams = np.where(np.arange(50) % 2 == 0, cam, C.UNKNOWN_CAMERA)
    p = C.partial_sums(it, pa.array([None if v == -1 else int(v) for v in cams], pa.int32()), x)
    assert set(p.camera_ids.tolist()) <= set(cam.tolist()) | {-1}
    ref, _ = numpy_reference(it, cams, x)
    c = C.finalize(p)
    for k, i in enumerate(c.item_ids):
        assert c.camera_ids[k] == ref[i][2]


def test_apply_delta_updates_touched_items_only():
    it, cam, x = data(n=300)
    base = C.combine([C.partial_sums(it[:250], cam[:250], x[:250])])
    removed = C.partial_sums(it[:20], cam[:20], x[:20])
    added = C.partial_sums(it[250:], cam[250:], x[250:])
    new, touched = C.apply_delta(base, added=added, removed=removed)
    expect = C.finalize(C.combine([C.partial_sums(it[20:], cam[20:], x[20:])]))
    got = C.finalize(new, items=touched)
    assert set(got.item_ids) == set(touched) & set(expect.item_ids)
    for k, i in enumerate(got.item_ids):
        j = list(expect.item_ids).index(i)
        assert np.abs(got.embeddings[k] - expect.embeddings[j]).max() < 1e-5
        assert got.counts[k] == expect.counts[j]
    with pytest.raises(VectorFileError, match="negative"):
        C.apply_delta(C.combine([removed]), removed=base)


def test_parquet_round_trip():
    it, cam, x = data(n=80)
    cams = np.where(np.arange(80) % 3 == 0, C.UNKNOWN_CAMERA, cam)
    p = C.combine([C.partial_sums(it, cams, x)])
    t = C.pair_sums_to_table(p, "m1")
    assert t.schema.field("sum").type == pa.list_(pa.float64(), 16)
    assert t.column("camera_id").null_count == int((p.camera_ids == -1).sum())
    q = C.pair_sums_from_table(t)
    assert (q.item_ids == p.item_ids).all() and (q.camera_ids == p.camera_ids).all()
    assert np.array_equal(q.sums, p.sums) and (q.counts == p.counts).all()


def test_bad_inputs():
    it, cam, x = data(n=10)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(VectorFileError, match="NaN"):
        C.partial_sums(it, cam, bad)
    with pytest.raises(VectorFileError, match="length"):
        C.partial_sums(it[:5], cam, x)
    zero = C.PairSums(np.array(["a"], object), np.array([1]), np.zeros((1, 16)), np.array([0]))
    with pytest.raises(VectorFileError, match="no image"):
        C.finalize(zero)
    with pytest.raises(VectorFileError, match="dimension"):
        C.combine([C.partial_sums(it, cam, x), C.partial_sums(it, cam, x[:, :8])])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_arrow_stages_equal_reference(dtype):
    """partial_table per batch -> shuffle by bucket -> combine_table -> split_item_rows (what the
    Ray job runs, here without Ray) equals the numpy reference."""
    import pyarrow.compute as pc

    from contracts.vectors import arrow_to_embeddings, make_embeddings_table

    it, cam, x = data(n=500, items=30)
    cams = [None if k % 9 == 0 else int(c) for k, c in enumerate(cam)]
    t = make_embeddings_table([f"i{k}" for k in range(500)], it, cams, ["gallery"] * 500, x, "m")
    parts = pa.concat_tables([C.partial_table(t.slice(s, 64), 3, dtype) for s in range(0, 500, 64)])
    rows = pa.concat_tables([C.combine_table(parts.filter(pc.equal(parts["bucket"], b)), dtype) for b in range(3)])
    assert len(set(rows["item_id"].to_pylist())) == rows.num_rows == 30  # an item lives in one bucket
    cents, sums = C.split_item_rows(rows, "m")
    assert sums.schema.field("sum").type.value_type == C.SUMS_DTYPES[dtype]
    ref = C.centroids_reference(it, [-1 if c is None else c for c in cams], x)
    order = np.argsort(cents["item_id"].to_numpy(zero_copy_only=False).astype(str))
    assert np.abs(arrow_to_embeddings(cents["embedding"])[order] - ref.embeddings).max() < 1e-5
    assert cents["count"].to_numpy()[order].tolist() == ref.counts.tolist()
    p = C.combine([C.pair_sums_from_table(sums)])
    direct = C.combine([C.partial_sums(it, [-1 if c is None else c for c in cams], x)])
    assert (p.item_ids == direct.item_ids).all() and (p.counts == direct.counts).all()
    assert np.abs(p.sums - direct.sums).max() < 1e-5


def test_to_item_sums_matches_metrics_item_sums():
    from index.evaluation.metrics import encode_labels, item_sums

    it, cam, x = data(n=200, items=12)
    codes = encode_labels(np.array(["3", "5"], object), it, np.array([1, 2]), cam)
    expect = item_sums(x, codes.gallery_items, codes.gallery_cams)
    got = C.to_item_sums(C.combine([C.partial_sums(it, cam, x)]), codes.vocabulary)
    for f in ("items", "counts", "cam_items", "cam_ids", "cam_counts"):
        assert np.array_equal(getattr(got, f), getattr(expect, f)), f
    assert np.abs(got.sums - expect.sums).max() < 1e-9 and np.abs(got.cam_sums - expect.cam_sums).max() < 1e-9
    with pytest.raises(VectorFileError, match="vocabulary"):
        C.to_item_sums(C.combine([C.partial_sums(it, cam, x)]), np.array(["3"]))


def test_partial_table_refuses_unnormalised_rows():
    from contracts.vectors import make_embeddings_table

    it, cam, x = data(n=20)
    t = make_embeddings_table([f"i{k}" for k in range(20)], it, cam, ["gallery"] * 20, x, "m")
    big = t.set_column(4, t.schema.field("embedding"),
                       pa.FixedSizeListArray.from_arrays(pa.array((3 * x).reshape(-1)), 16))
    with pytest.raises(VectorFileError, match="normalised"):
        C.partial_table(big, 2)
    assert C.partial_table(big, 2, normalized=False).num_rows > 0
