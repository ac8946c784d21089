"""index.evaluation.reranked: exact metrics after re-ranking, dense vs sparse k-reciprocal, samples."""
import numpy as np
import pyarrow as pa
import pytest

from contracts.vectors import VectorMeta, VectorTable, l2_normalize
from index.evaluation import metrics as M
from index.evaluation.protocol import per_query_metrics
from index.evaluation.reranked import choose_sample_rows, evaluate_ranked
from index.rerank.chain import RerankConfig
from index.rerank.kreciprocal import k_reciprocal_from_embeddings


def table(x, items, cams, prefix):
    ids = np.asarray([f"{prefix}{i:05d}.jpg" for i in range(len(x))], object)
    return VectorTable(x.astype(np.float32), np.asarray(items, object), ids,
                       None if cams is None else np.asarray(cams, np.int64),
                       VectorMeta("m", x.shape[1], True), "embeddings", pa.table({"image_id": ids}))


def reid_data(seed=0, n_items=80, per_item=8, dim=32, noise=0.9, cams=True):
    """Identities with spread (several images each), junk rows, 4 cameras."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_items, dim))
    gi = np.repeat(np.arange(n_items), per_item)
    g = l2_normalize(centres[gi] + noise * rng.normal(size=(len(gi), dim)))
    g_items = gi.astype(str).astype(object)
    g_items[::19] = "-1"
    qi = np.arange(n_items)
    q = l2_normalize(centres[qi] + noise * rng.normal(size=(len(qi), dim)))
    gc = rng.integers(1, 5, len(gi)) if cams else None
    qc = rng.integers(1, 5, len(qi)) if cams else None
    return table(q, qi.astype(str), qc, "q"), table(g, g_items, gc, "g")


def summary(ev):
    return M.summarize(ev.per_query)


@pytest.mark.parametrize("cams", [True, False])
@pytest.mark.parametrize("mode", ["instance", "centroid"])
def test_none_equals_plain_evaluation(mode, cams):
    query, gallery = reid_data(cams=cams)
    ref = per_query_metrics(query, gallery, mode, chunk_size=13)
    for cfg in (None, RerankConfig()):
        got = evaluate_ranked(query, gallery, mode, cfg, chunk_size=7).per_query
        np.testing.assert_array_equal(got.first_match, ref.first_match)
        np.testing.assert_allclose(got.ap, ref.ap, equal_nan=True, rtol=0, atol=0)


def test_kreciprocal_improves_map_dense_equals_sparse():
    query, gallery = reid_data()
    cfg = RerankConfig(methods=("kreciprocal",), k1=10, k2=3, topk=200)
    base = summary(evaluate_ranked(query, gallery, "instance"))
    dense = evaluate_ranked(query, gallery, "instance", cfg, form="dense")
    sparse = evaluate_ranked(query, gallery, "instance", cfg, form="sparse")
    assert dense.form == "dense" and sparse.form == "sparse"
    assert summary(dense)["mAP"] > base["mAP"] + 0.03
    assert summary(sparse)["mAP"] == pytest.approx(summary(dense)["mAP"], abs=0.005)
    assert summary(sparse)["cmc"] == pytest.approx(summary(dense)["cmc"], abs=0.02)
    # auto picks the form by gallery size
    assert evaluate_ranked(query, gallery, "instance", cfg, dense_max=100).form == "sparse"


def test_dense_form_uses_the_exact_final_distances():
    query, gallery = reid_data(seed=3)
    cfg = RerankConfig(methods=("kreciprocal",), k1=12, k2=4, lambda_value=0.4)
    keep = gallery.item_ids != "-1"
    final = k_reciprocal_from_embeddings(query.vectors, gallery.vectors, 12, 4, 0.4, gallery_keep=keep)
    codes = M.encode_labels(query.item_ids.astype(str), gallery.item_ids.astype(str), query.camera_ids,
                            gallery.camera_ids)
    ref = M.metrics_from_scores(-final, codes, np.arange(len(query.vectors)))
    got = evaluate_ranked(query, gallery, "instance", cfg).per_query
    np.testing.assert_allclose(got.ap, ref.ap, atol=1e-12)


@pytest.mark.parametrize("methods", [("aqe",), ("alpha-qe",), ("dba",), ("dba", "alpha-qe", "kreciprocal")])
def test_expansion_methods_change_rankings_and_help(methods):
    query, gallery = reid_data(seed=1)
    base = summary(evaluate_ranked(query, gallery, "instance"))
    got = summary(evaluate_ranked(query, gallery, "instance", RerankConfig(methods=methods, k1=10, k2=3)))
    assert got["mAP"] > base["mAP"] + 0.02


def test_samples_status_and_junk():
    query, gallery = reid_data(seed=2)
    codes = M.encode_labels(query.item_ids.astype(str), gallery.item_ids.astype(str), query.camera_ids,
                            gallery.camera_ids)
    rows = choose_sample_rows(codes, 5)
    assert len(rows) == 5 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, choose_sample_rows(codes, 5))  # deterministic
    plain = evaluate_ranked(query, gallery, "instance", None, sample_rows=rows, top_n=10)
    kr = evaluate_ranked(query, gallery, "instance", RerankConfig(methods=("kreciprocal",), k1=10, k2=3),
                         sample_rows=rows, top_n=10)
    changed = False
    for a, b in zip(plain.samples, kr.samples):
        for s in (a, b):
            q_item, q_cam = query.item_ids[s.query_row], query.camera_ids[s.query_row]
            assert len(s.gallery_rows) == 10 and np.all(np.diff(s.scores) <= 0)
            for g_row, status in zip(s.gallery_rows, s.status):
                item, cam = gallery.item_ids[g_row], gallery.camera_ids[g_row]
                want = ("ignored" if item == "-1" or (item == q_item and cam == q_cam)
                        else "match" if item == q_item else "wrong")
                assert status == want
        assert "-1" not in set(gallery.item_ids[b.gallery_rows])  # junk takes no part in re-ranking
        changed |= not np.array_equal(a.gallery_rows, b.gallery_rows)
    assert changed
    # centroid mode: one picture per item, never from the query's camera
    cen = evaluate_ranked(query, gallery, "centroid", RerankConfig(methods=("alpha-qe",)), sample_rows=rows)
    for s in cen.samples:
        assert len(set(s.items)) == len(s.items)
        assert np.all(gallery.camera_ids[s.gallery_rows] != query.camera_ids[s.query_row])
        np.testing.assert_array_equal(gallery.item_ids[s.gallery_rows], s.items)


def test_centroid_rerank_runs_per_camera_and_reports_form():
    query, gallery = reid_data(seed=4)
    cfg = RerankConfig(methods=("kreciprocal",), k1=6, k2=2)
    ev = evaluate_ranked(query, gallery, "centroid", cfg)
    ref = per_query_metrics(query, gallery, "centroid")
    assert ev.form == "dense"
    np.testing.assert_array_equal(ev.per_query.valid, ref.valid)  # same valid queries, own camera excluded
    assert not np.allclose(ev.per_query.ap[ev.per_query.valid], ref.ap[ref.valid])
