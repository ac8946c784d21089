"""prepare_data: shard indexes and eligible items for a training run, without Ray."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from model.config import Config, DataConfig, RunConfig, TrainConfig
from model.shards import write_shards
from model.train_data import prepare_data


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(root, split, counts):
    """counts: {item_id: number of images} -> root/<split>-NNNNNN.tar."""
    data = _png()
    rows = [({"image_id": f"{split}/{item}_{j}.png", "item_id": item, "camera_id": j % 2 + 1,
              "split": split, "path": f"{split}/{item}_{j}.png"}, data, "png")
            for item, n in sorted(counts.items()) for j in range(n)]
    write_shards(rows, str(root), split, shard_size=5)


def _cfg(shards, **train):
    return Config(data=DataConfig(shards=str(shards), P=2, M=2),
                  train=TrainConfig(**train), run=RunConfig(num_workers=1))


def test_items_with_too_few_images_are_left_out(tmp_path, capsys):
    _write(tmp_path, "train", {"a": 3, "b": 2, "c": 1})
    out = prepare_data(_cfg(tmp_path, eval_every=-1))
    assert sorted(out["items"]) == ["a", "b"]
    assert [len(out["items"][k]) for k in ("a", "b")] == [3, 2]
    assert len(out["train_index"]) == 6
    assert out["eval"] is False and "query_index" not in out
    # workers run elsewhere: every shard URL is absolute
    assert all(os.path.isabs(u) for u in out["train_index"].urls)
    assert "3 items, 2 with >= 2 images (1 skipped)" in capsys.readouterr().out


def test_validation_indexes_when_query_and_gallery_shards_exist(tmp_path):
    _write(tmp_path, "train", {"a": 2, "b": 2})
    _write(tmp_path, "query", {"x": 1})
    _write(tmp_path, "gallery", {"x": 3, "y": 2})
    out = prepare_data(_cfg(tmp_path))
    assert out["eval"] is True
    assert len(out["query_index"]) == 1 and len(out["gallery_index"]) == 5
    # eval_every = -1 switches validation off even when the shards are there
    assert prepare_data(_cfg(tmp_path, eval_every=-1))["eval"] is False


def test_validation_skipped_without_gallery(tmp_path, capsys):
    _write(tmp_path, "train", {"a": 2, "b": 2})
    _write(tmp_path, "query", {"x": 1})
    assert prepare_data(_cfg(tmp_path))["eval"] is False
    assert "validation skipped" in capsys.readouterr().out


def test_missing_or_too_small_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no shards given"):
        prepare_data(Config())
    with pytest.raises(FileNotFoundError, match="no train-NNNNNN.tar shards"):
        _write(tmp_path, "query", {"x": 1})
        prepare_data(_cfg(tmp_path))
    _write(tmp_path, "train", {"a": 2, "b": 1})
    with pytest.raises(ValueError, match="need at least P x num_workers = 2 training items, have 1"):
        prepare_data(_cfg(tmp_path))
