"""Test-time flip: the embedding of an image is the mean of its and its mirror's, L2-normalised,
applied by embed.py's runner and by training's validation when the model config says so."""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model import embedding as E
from model.checkpoint import load_model, save_model
from model.config import ModelConfig
from model.net import build_model


def _asymmetric_jpeg(seed: int) -> bytes:
    """A picture that is not its own mirror (left half bright, right half noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)
    arr[:, :8] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _save(tmp_path, flip: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", pooling="avg", input_size=(32, 16), flip_test=flip)
    net = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics so the post-BN feature is not symmetric
        net.bottleneck.running_mean.normal_()
    d = tmp_path / ("flip" if flip else "plain")
    save_model(net, cfg, str(d))
    return str(d)


def test_flip_embedding_is_the_normalised_mean_of_image_and_mirror():
    torch.manual_seed(1)
    net = build_model(ModelConfig(backbone="resnet18", pooling="rmac", input_size=(32, 16))).eval()
    x = torch.randn(3, 3, 32, 16)
    with torch.no_grad():
        a, b = net(x), net(x.flip(-1))
    want = torch.nn.functional.normalize((a + b) / 2, dim=1).numpy()
    got = E.forward_embeddings(net, x, "cpu", flip=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = E.forward_embeddings(net, x, "cpu", flip=False)
    np.testing.assert_allclose(plain, torch.nn.functional.normalize(a, dim=1).numpy(), atol=1e-5)
    assert np.abs(got - plain).max() > 1e-3  # the flip really changes the embedding


def test_runner_follows_the_model_config(tmp_path):
    images = [_asymmetric_jpeg(0), _asymmetric_jpeg(1)]
    plain_dir, flip_dir = _save(tmp_path, False), _save(tmp_path, True)
    plain = E.ModelRunner(plain_dir, device="cpu", threads=1, freeze=False).embed_images(images)
    flip = E.ModelRunner(flip_dir, device="cpu", threads=1, freeze=False).embed_images(images)
    net, cfg, _ = load_model(flip_dir)
    from model.transforms import BatchEvalTransform, decode_image

    tf = BatchEvalTransform(cfg)
    x = tf.normalize([tf.resize(decode_image(b)) for b in images])
    np.testing.assert_allclose(plain.embeddings, E.forward_embeddings(net, x, "cpu"), atol=1e-5)
    np.testing.assert_allclose(flip.embeddings, E.forward_embeddings(net, x, "cpu", flip=True),
                               atol=1e-5)
    assert np.abs(flip.embeddings - plain.embeddings).max() > 1e-3
    # the frozen CPU model (embed.py's default) flips the same way
    frozen = E.ModelRunner(flip_dir, device="cpu", threads=1, freeze=True).embed_images(images)
    np.testing.assert_allclose(frozen.embeddings, flip.embeddings, atol=1e-4)


def test_flip_is_recorded_and_old_configs_embed_without_it(tmp_path):
    d = _save(tmp_path, True)
    assert load_model(d)[1].flip_test is True
    assert ModelConfig().flip_test is True  # the recipe default
    # a model directory written before the field existed keeps its embeddings
    old = ModelConfig(backbone="resnet18").to_json().replace('"flip_test": true', '"_": 0')
    old = old.replace(',\n  "_": 0', "").replace('"_": 0,\n  ', "")
    assert "flip_test" not in old
    assert ModelConfig.from_json(old).flip_test is False


def test_flip_changes_the_stored_config(tmp_path):
    # the field is in the ModelConfig dataclass, so config.json (what the model id is to cover)
    # differs between a flip and a plain model with the same weights
    _save(tmp_path, False), _save(tmp_path, True)
    assert (tmp_path / "plain" / "config.json").read_text() != (tmp_path / "flip" / "config.json").read_text()
    assert (tmp_path / "plain" / "model.pt").read_bytes() == (tmp_path / "flip" / "model.pt").read_bytes()


def test_flip_and_plain_models_have_different_ids(tmp_path):
    a, b = _save(tmp_path, False), _save(tmp_path, True)
    assert load_model(a)[2] != load_model(b)[2]


def test_validation_embedding_follows_the_config(tmp_path):
    """Training's validation (model.data.embed_rows) embeds as embed.py does."""
    from model.data import embed_rows
    from model.sampler import index_shards
    from model.shards import write_shards
    from model.transforms import eval_transform

    samples = [({"image_id": f"q/{i}.png", "item_id": str(i), "camera_id": 1, "split": "query",
                 "path": f"q/{i}.png"}, _asymmetric_jpeg(i), "png") for i in range(3)]
    idx = index_shards(write_shards(samples, str(tmp_path / "shards"), "query", shard_size=5))
    plain_dir, flip_dir = _save(tmp_path, False), _save(tmp_path, True)
    flip_net, cfg, _ = load_model(flip_dir)
    plain_net = load_model(plain_dir)[0]
    tf = eval_transform(cfg)
    _, got_flip = embed_rows(flip_net, idx, np.arange(3), tf, batch_size=2)
    _, got_plain = embed_rows(plain_net, idx, np.arange(3), tf, batch_size=2)
    runner = E.ModelRunner(flip_dir, device="cpu", threads=1, freeze=False)
    np.testing.assert_allclose(got_flip, runner.embed_images([s[1] for s in samples]).embeddings,
                               atol=1e-4)
    assert np.abs(got_flip - got_plain).max() > 1e-3


def test_neck_feat_picks_the_side_of_the_bn_neck():
    torch.manual_seed(2)
    after = build_model(ModelConfig(backbone="resnet18", pooling="avg", input_size=(32, 16))).eval()
    before = build_model(ModelConfig(backbone="resnet18", pooling="avg", input_size=(32, 16),
                                     neck_feat="before")).eval()
    before.load_state_dict(after.state_dict())
    with torch.no_grad():
        after.bottleneck.running_mean.normal_()
        before.bottleneck.running_mean.copy_(after.bottleneck.running_mean)
        x = torch.randn(2, 3, 32, 16)
        pooled = after.pool(after.backbone(x))
        torch.testing.assert_close(before(x), pooled)
        torch.testing.assert_close(after(x), after.bottleneck(pooled))
    with pytest.raises(ValueError, match="neck_feat"):
        ModelConfig(neck_feat="middle")
