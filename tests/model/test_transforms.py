"""Decoding guard and transforms."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import ModelConfig
from model.transforms import (
    BatchEvalTransform,
    ImageDecodeError,
    decode_image,
    eval_transform,
    train_transform,
)


def _jpeg(w=32, h=64, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, format="JPEG")
    return buf.getvalue()


def test_decode_and_guard():
    img = decode_image(_jpeg(mode="L"))
    assert img.mode == "RGB" and img.size == (32, 64)
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(_jpeg(), max_pixels=100)


def test_transform_shapes_and_normalisation():
    cfg = ModelConfig(input_size=(48, 24), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = Image.new("RGB", (30, 70), (255, 128, 0))
    x = eval_transform(cfg)(img)
    assert x.shape == (3, 48, 24) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 10, 10], torch.tensor([2.0, 0.0078, -2.0]), atol=1e-3, rtol=0)
    torch.manual_seed(0)
    y = train_transform(cfg)(img)
    assert y.shape == (3, 48, 24)


@pytest.mark.parametrize("size", [(30, 70), (24, 48)])  # one image resized, one already at size
def test_batch_eval_transform_equals_eval_transform(size):
    cfg = ModelConfig(input_size=(48, 24))
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(3)]
    tf = BatchEvalTransform(cfg)
    x = tf.normalize([tf.resize(im) for im in imgs])
    want = torch.stack([eval_transform(cfg)(im) for im in imgs])
    assert x.shape == (3, 3, 48, 24) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
