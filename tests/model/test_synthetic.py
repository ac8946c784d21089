import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.ingest import parse_market_name
from model.synthetic import (
    GALLERY_DIR,
    QUERY_DIR,
    TRAIN_DIR,
    SyntheticConfig,
    camera_params,
    hsv_to_rgb,
    random_appearance,
    random_jitter,
    render,
    write_dataset,
)

NAME = r"^(-1|\d{4,})_c\d+s\d_\d{6}_\d{2}\.jpg$"


def listing(root):
    out = {}
    for folder in (TRAIN_DIR, QUERY_DIR, GALLERY_DIR):
        out[folder] = sorted(os.listdir(root / folder))
    return out


def test_layout_counts_names_and_split(tmp_path):
    cfg = SyntheticConfig(items=11, images_per_item=5, cameras=3, size=(32, 16), seed=3,
                          query_per_item=2)
    counts = write_dataset(cfg, str(tmp_path), workers=1)
    files = listing(tmp_path)
    assert {k: len(v) for k, v in files.items()} == counts == cfg.expected_counts()
    # 6 train items x 5; 5 test items: 2 queries + 3 gallery each; 2% junk/distractor -> 1 each
    assert counts == {TRAIN_DIR: 30, QUERY_DIR: 10, GALLERY_DIR: 17}
    items = defaultdict(set)
    cams = set()
    for folder, names in files.items():
        for n in names:
            assert re.match(NAME, n), n
            item, cam = parse_market_name(n)
            items[folder].add(item)
            cams.add(cam)
    assert items[TRAIN_DIR] == {str(i) for i in range(1, 7)}
    assert items[QUERY_DIR] == {str(i) for i in range(7, 12)}
    assert items[GALLERY_DIR] == {str(i) for i in range(7, 12)} | {"-1", "0"}
    assert cams <= {1, 2, 3}
    # Every query has a gallery image of its item from another camera (ReID rule).
    gallery = [parse_market_name(n) for n in files[GALLERY_DIR]]
    for n in files[QUERY_DIR]:
        item, cam = parse_market_name(n)
        assert any(i == item and c != cam for i, c in gallery)
    img = Image.open(tmp_path / QUERY_DIR / files[QUERY_DIR][0])
    assert (img.format, img.size, img.mode) == ("JPEG", (16, 32), "RGB")


def test_deterministic_and_worker_independent(tmp_path):
    cfg = SyntheticConfig(items=130, images_per_item=2, cameras=2, size=(16, 8), seed=5,
                          junk=70, distractors=3)
    write_dataset(cfg, str(tmp_path / "a"), workers=1)
    write_dataset(cfg, str(tmp_path / "b"), workers=2)
    write_dataset(SyntheticConfig(**{**cfg.__dict__, "seed": 6}), str(tmp_path / "c"), workers=1)
    a, b, c = (listing(tmp_path / x) for x in "abc")
    assert a == b
    assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in c.items()}
    same = differ = 0
    for folder, names in a.items():
        for n in names:
            data = (tmp_path / "a" / folder / n).read_bytes()
            assert data == (tmp_path / "b" / folder / n).read_bytes()
            other = tmp_path / "c" / folder / n
            if other.exists():  # another seed: other cameras, so partly other names
                differ += data != other.read_bytes()
                same += 1
    assert same > 0 and differ == same
    assert sum(n.startswith("-1_") for n in a[GALLERY_DIR]) == 70


def test_identity_is_learnable_from_pixels(tmp_path):
    """Even raw down-sampled pixels retrieve the right identity far above chance."""
    cfg = SyntheticConfig(items=60, images_per_item=8, cameras=4, size=(64, 32), seed=1)
    write_dataset(cfg, str(tmp_path), workers=1)

    def load(folder):
        feats, items, cams = [], [], []
        for n in sorted(os.listdir(tmp_path / folder)):
            item, cam = parse_market_name(n)
            im = Image.open(tmp_path / folder / n).resize((8, 16), Image.Resampling.BILINEAR)
            x = np.asarray(im, np.float32).ravel()
            x -= x.mean()
            feats.append(x / np.linalg.norm(x))
            items.append(item)
            cams.append(cam)
        return np.stack(feats), np.array(items), np.array(cams)

    q, qi, qc = load(QUERY_DIR)
    g, gi, gc = load(GALLERY_DIR)
    scores = q @ g.T
    hits = []
    for i in range(len(q)):
        keep = ~(((gi == qi[i]) & (gc == qc[i])) | (gi == "-1"))
        hits.append(gi[keep][np.argmax(scores[i][keep])] == qi[i])
    chance = 1 / len(set(gi) - {"-1"})
    assert len(hits) == 30
    assert np.mean(hits) > 6 * chance  # measured 0.37 vs chance 0.03


def test_render_shapes_and_nuisances():
    rng = np.random.default_rng(0)
    app = {k: np.repeat(v, 4, axis=0) for k, v in random_appearance(rng, 1).items()}
    cam = camera_params(0, 3)
    img = render(app, random_jitter(rng, 4), np.array([1, 1, 2, 3]), cam, (40, 20), rng)
    assert img.shape == (4, 40, 20, 3) and img.dtype == np.uint8
    # Same item, different cameras: different colour statistics; figure covers the centre.
    assert np.abs(img[0].mean((0, 1)) - img[3].mean((0, 1))).max() > 1
    empty = render(app, random_jitter(rng, 4), np.ones(4, int), cam, (40, 20), rng,
                   figure=np.zeros(4, bool))
    assert empty.std(axis=(1, 2)).mean() < img.std(axis=(1, 2)).mean()


def test_hsv_to_rgb_matches_colorsys():
    import colorsys

    h, s, v = np.random.default_rng(1).random((3, 100))
    want = np.array([colorsys.hsv_to_rgb(*x) for x in zip(h, s, v)]) * 255
    assert np.allclose(hsv_to_rgb(h, s, v), want, atol=1e-3)


@pytest.mark.parametrize("kw, message", [
    ({"items": 0}, "--items"), ({"images_per_item": 0}, "--images-per-item"),
    ({"cameras": 0}, "--cameras"), ({"size": (4, 2)}, "--size"),
    ({"train_fraction": 2.0}, "--train-fraction"), ({"junk": -1}, "--junk"),
])
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kw).validate()


def test_single_camera_and_all_train(tmp_path):
    cfg = SyntheticConfig(items=3, images_per_item=2, cameras=1, size=(16, 8), train_fraction=1.0)
    counts = write_dataset(cfg, str(tmp_path))
    assert counts == {TRAIN_DIR: 6, QUERY_DIR: 0, GALLERY_DIR: 0}
    assert all(parse_market_name(n)[1] == 1 for n in os.listdir(Path(tmp_path) / TRAIN_DIR))
