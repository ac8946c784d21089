import numpy as np
import pyarrow as pa
import pytest

from index.evaluation import metrics as M
from index.evaluation.protocol import per_query_metrics_from_results
from tests.index.evaluation.test_metrics import random_reid


def results_table(q_ids, g_items, g_ids, scores, k, centroid=False):
    rows = {"query_id": [], "rank": [], "item_id": [], "image_id": [], "score": []}
    for qid, s in zip(q_ids, scores):
        order = np.argsort(-s, kind="stable")[:k]
        rows["query_id"] += [qid] * len(order)
        rows["rank"] += list(range(len(order)))
        rows["item_id"] += [str(g_items[j]) for j in order]
        rows["image_id"] += [None if centroid else g_ids[j] for j in order]
        rows["score"] += s[order].tolist()
    return pa.table({"query_id": pa.array(rows["query_id"]), "rank": pa.array(rows["rank"], pa.int32()),
                     "item_id": pa.array(rows["item_id"]), "image_id": pa.array(rows["image_id"], pa.string()),
                     "score": pa.array(rows["score"], pa.float32())})


def test_full_length_lists_give_the_exact_metrics():
    rng = np.random.default_rng(4)
    q, qi, qc, g, gi, gc = random_reid(rng)
    q_ids = [f"q{i}" for i in range(len(q))]
    g_ids = [f"g{i}" for i in range(len(g))]
    res = results_table(q_ids, gi, g_ids, q @ g.T, k=len(g))
    got, k, mode = per_query_metrics_from_results(res, qi.astype(str), q_ids, qc, gi.astype(str), g_ids, gc)
    codes = M.encode_labels(qi.astype(str), gi.astype(str), qc, gc)
    exact = M.evaluate_instances(q, g, codes)
    assert mode == "instance" and k == len(g)
    np.testing.assert_allclose(got.ap[exact.valid], exact.ap[exact.valid], atol=1e-9)
    np.testing.assert_allclose(got.inp[exact.valid], exact.inp[exact.valid], atol=1e-9)
    np.testing.assert_array_equal(got.valid, exact.valid)
    np.testing.assert_array_equal(got.first_match, exact.first_match)


def test_truncated_lists_hand_case():
    # query A cam 1; gallery has 3 true matches not from cam 1, list of k=3:
    # [A cam1 (removed), B, A cam2, A cam3] -> kept [B, A, A]: hits at ranks 1, 2
    g_items, g_ids, g_cams = ["A", "B", "A", "A", "A"], ["a1", "b", "a2", "a3", "a4"], [1, 2, 2, 3, 4]
    res = pa.table({"query_id": ["q"] * 4, "rank": pa.array([0, 1, 2, 3], pa.int32()),
                    "item_id": ["A", "B", "A", "A"], "image_id": ["a1", "b", "a2", "a3"],
                    "score": pa.array([0.9, 0.8, 0.7, 0.6], pa.float32())})
    got, _k, _ = per_query_metrics_from_results(res, ["A"], ["q"], [1], g_items, g_ids, g_cams, k=3)
    assert got.num_matches[0] == 3
    assert got.first_match[0] == 1
    assert got.ap[0] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert got.inp[0] == 0.0  # the third match was not retrieved


def test_centroid_results_have_one_relevant_item():
    res = pa.table({"query_id": ["q", "q"], "rank": pa.array([0, 1], pa.int32()), "item_id": ["B", "A"],
                    "image_id": pa.array([None, None], pa.string()), "score": pa.array([0.9, 0.8], pa.float32())})
    got, _, mode = per_query_metrics_from_results(res, ["A"], ["q"], None, ["A", "A", "B"], ["a1", "a2", "b"], None)
    assert mode == "centroid"
    assert got.ap[0] == pytest.approx(0.5) and got.num_matches[0] == 1
