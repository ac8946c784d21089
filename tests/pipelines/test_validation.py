"""reid_metrics: training's validation scores through index's metrics, no Ray, no network."""
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines._validation import reid_metrics


def _index(items, cams):
    return SimpleNamespace(item_id=np.array(items, dtype=object),
                           camera_id=np.array(cams, dtype=np.int64))


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_separated_items_score_one():
    q = _index(["a", "b"], [1, 1])
    g = _index(["a", "a", "b", "b"], [2, 3, 2, 3])
    qe = _unit([[1, 0], [0, 1]])
    ge = _unit([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1]])
    m = reid_metrics(q, g, {"query": (np.arange(2), qe), "gallery": (np.arange(4), ge)})
    assert m == pytest.approx({"instance_mAP": 1.0, "instance_rank1": 1.0, "centroid_mAP": 1.0,
                               "centroid_rank1": 1.0, "num_valid_queries": 2})


def test_rows_select_the_labels_and_a_miss_lowers_the_scores():
    # the index holds 3 gallery images, only rows 0 and 2 were embedded; no cameras known
    q = _index(["a"], [-1])
    g = _index(["b", "unused", "a"], [-1, -1, -1])
    qe = _unit([[1, 0]])
    ge = _unit([[1, 0.2], [0, 1]])  # row 0 (item b) is nearer than row 2 (item a)
    m = reid_metrics(q, g, {"query": (np.array([0]), qe), "gallery": (np.array([0, 2]), ge)})
    assert m["instance_rank1"] == 0.0
    assert m["instance_mAP"] == pytest.approx(0.5)  # the one match is ranked second
    assert m["num_valid_queries"] == 1


def test_same_camera_matches_are_excluded_when_cameras_are_known():
    # the only same-item gallery image shares the query's camera: no valid query remains
    q = _index(["a", "b"], [1, 1])
    g = _index(["a", "b", "b"], [1, 2, 3])
    qe, ge = _unit([[1, 0], [0, 1]]), _unit([[1, 0], [0, 1], [0.1, 1]])
    m = reid_metrics(q, g, {"query": (np.arange(2), qe), "gallery": (np.arange(3), ge)})
    assert m["num_valid_queries"] == 1
    assert m["instance_mAP"] == pytest.approx(1.0)
