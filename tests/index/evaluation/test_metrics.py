import numpy as np
import pytest

from index.evaluation import metrics as M


def reference_eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The standard Market-1501 evaluation (torchreid / fast-reid eval_market1501, python
    version), with a stable argsort. Junk (-1) must be removed from the gallery beforehand."""
    num_q, _num_g = distmat.shape
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_AP, all_INP = [], [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw_cmc = matches[q_idx][np.invert(remove)]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        pos_idx = np.where(raw_cmc == 1)
        all_INP.append(cmc[np.max(pos_idx)] / (np.max(pos_idx) + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(np.pad(cmc[:max_rank], (0, max(0, max_rank - len(cmc))), mode="edge"))
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum() / (np.arange(len(raw_cmc)) + 1.0)
        all_AP.append((tmp_cmc * raw_cmc).sum() / num_rel)
    all_cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_AP)
    return all_cmc, float(np.mean(all_AP)), float(np.mean(all_INP)), len(all_AP)


def random_reid(rng, n_q=40, n_g=300, d=16, n_items=25, n_cams=4, junk=30, distractors=20):
    centers = rng.normal(size=(n_items, d))
    q_items = rng.integers(1, n_items, n_q)
    g_items = np.concatenate([rng.integers(1, n_items, n_g - junk - distractors),
                              np.full(junk, -1), np.zeros(distractors, int)])
    def emb(items):
        x = centers[np.maximum(items, 0)] * 0.6 + rng.normal(size=(len(items), d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return (emb(q_items), q_items, rng.integers(1, n_cams + 1, n_q),
            emb(g_items), g_items, rng.integers(1, n_cams + 1, n_g))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_mode_matches_reference_eval_market1501(seed):
    rng = np.random.default_rng(seed)
    q, qi, qc, g, gi, gc = random_reid(rng)
    codes = M.encode_labels(qi.astype(str), gi.astype(str), qc, gc)
    report = M.summarize(M.evaluate_instances(q, g, codes, chunk_size=7))

    keep = gi != -1  # the reference expects junk already removed
    dist = -(q @ g[keep].T)
    cmc, mAP, mINP, n_valid = reference_eval_market1501(dist, qi, gi[keep], qc, gc[keep])
    assert report["num_valid_queries"] == n_valid
    assert report["mAP"] == pytest.approx(mAP, abs=1e-6)
    assert report["mINP"] == pytest.approx(mINP, abs=1e-6)
    for k in M.CMC_RANKS:
        assert report["cmc"][str(k)] == pytest.approx(cmc[k - 1], abs=1e-6)


def test_ties_are_broken_like_a_stable_sort():
    rng = np.random.default_rng(5)
    q, qi, qc, g, gi, gc = random_reid(rng, junk=0)
    # quantise similarities so many positives and negatives tie
    g = np.round(g * 2) / 2
    q = np.round(q * 2) / 2
    codes = M.encode_labels(qi.astype(str), gi.astype(str), qc, gc)
    report = M.summarize(M.evaluate_instances(q, g, codes))
    cmc, mAP, mINP, _n_valid = reference_eval_market1501(-(q @ g.T), qi, gi, qc, gc)
    assert report["mAP"] == pytest.approx(mAP, abs=1e-6)
    assert report["mINP"] == pytest.approx(mINP, abs=1e-6)
    assert report["cmc"]["1"] == pytest.approx(cmc[0], abs=1e-6)


def test_hand_computed_case_with_camera_junk_and_distractor():
    # one query: item A, camera 1. Gallery scores in descending order:
    # 0.9 A cam1 (same camera: removed), 0.8 junk (removed), 0.7 distractor "0" (negative),
    # 0.6 A cam2 (match), 0.5 B cam2 (negative), 0.4 A cam3 (match)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    codes = M.encode_labels(["A"], ["A", "-1", "0", "A", "B", "A"], [1], [1, 2, 2, 2, 2, 3])
    m = M.metrics_from_scores(scores, codes, np.array([0]))
    # remaining ranking: 0 (neg), A (match at rank 2), B (neg), A (match at rank 4)
    assert m.first_match[0] == 1
    assert m.ap[0] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m.inp[0] == pytest.approx(2 / 4)
    assert m.num_matches[0] == 2


def test_fashion_rule_removes_nothing():
    scores = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    codes = M.encode_labels(["A"], ["A", "B", "A"])
    m = M.metrics_from_scores(scores, codes, np.array([0]))
    assert m.first_match[0] == 0
    assert m.ap[0] == pytest.approx((1 + 2 / 3) / 2)


def test_query_without_match_is_not_valid():
    scores = np.array([[0.9, 0.8], [0.1, 0.2]], dtype=np.float32)
    codes = M.encode_labels(["A", "C"], ["A", "B"], [1, 1], [2, 2])
    report = M.summarize(M.metrics_from_scores(scores, codes, np.array([0, 1])))
    assert report["num_queries"] == 2
    assert report["num_valid_queries"] == 1
    assert report["mAP"] == 1.0


def test_chunking_gives_identical_results():
    rng = np.random.default_rng(3)
    q, qi, qc, g, gi, gc = random_reid(rng, n_q=50)
    codes = M.encode_labels(qi.astype(str), gi.astype(str), qc, gc)
    whole = M.evaluate_instances(q, g, codes, chunk_size=50)
    for chunk in (1, 3, 16):
        part = M.evaluate_instances(q, g, codes, chunk_size=chunk)
        np.testing.assert_array_equal(whole.ap, part.ap)
        np.testing.assert_array_equal(whole.first_match, part.first_match)
    sums = M.item_sums(g, codes.gallery_items, codes.gallery_cams)
    a = M.evaluate_centroids(q, codes, sums, chunk_size=50)
    b = M.evaluate_centroids(q, codes, sums, chunk_size=4)
    np.testing.assert_array_equal(a.ap, b.ap)


def slow_centroid_reference(q, qi, qc, g, gi, gc):
    """Obvious loop: per query, build each item's centroid from images not of its camera."""
    aps, firsts = [], []
    for x, item, cam in zip(q, qi, qc):
        names, cents = [], []
        for it in sorted(set(gi.tolist()) - {-1}):
            sel = (gi == it) & (gc != cam)
            if sel.any():
                c = g[sel].mean(0)
                cents.append(c / np.linalg.norm(c))
                names.append(it)
        if item not in names:
            aps.append(np.nan)
            firsts.append(-1)
            continue
        s = np.array(cents) @ x
        order = np.argsort(-s, kind="stable")
        rank = int(np.flatnonzero(np.array(names)[order] == item)[0])
        aps.append(1 / (rank + 1))
        firsts.append(rank)
    return np.array(aps), np.array(firsts)


def test_centroid_mode_excludes_query_camera():
    rng = np.random.default_rng(7)
    q, qi, qc, g, gi, gc = random_reid(rng, n_q=30, n_g=200, n_items=12, n_cams=3)
    codes = M.encode_labels(qi.astype(str), gi.astype(str), qc, gc)
    m = M.evaluate_centroids(q, codes, M.item_sums(g, codes.gallery_items, codes.gallery_cams))
    ref_ap, ref_first = slow_centroid_reference(q, qi, qc, g, gi, gc)
    np.testing.assert_allclose(m.ap, ref_ap, atol=1e-6)
    np.testing.assert_array_equal(m.first_match, ref_first)


def test_centroid_mode_item_only_seen_by_query_camera_is_absent():
    # item A has gallery images only from camera 1; a camera-1 query of A has no match
    g = np.eye(3, dtype=np.float32)
    codes = M.encode_labels(["A"], ["A", "B", "B"], [1], [1, 2, 3])
    m = M.evaluate_centroids(g[:1], codes, M.item_sums(g, codes.gallery_items, codes.gallery_cams))
    assert not m.valid[0]


def test_rank_positions_counts_only_negatives():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    ranks = M.rank_positions(scores, positives=np.array([2, 4]), excluded=np.array([2, 4, 1]))
    # kept ranking: 3 (0.7), 2 (0.5, pos), 4 (0.3, pos), 0 (0.1)
    np.testing.assert_array_equal(ranks, [1, 2])
