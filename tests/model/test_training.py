"""Training logic without Ray: schedule, step/accumulation, center-loss update, state, loader."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import build_model
from model.config import ModelConfig, TrainConfig
from model.data import BatchLoader, embed_rows
from model.losses import CenterLoss
from model.sampler import ShardReader, eligible_items, index_shards, iter_plan_rows, plan_epoch
from model.shards import write_shards
from model.training import (
    build_optimizers,
    compute_losses,
    lr_factor,
    restore_training_state,
    train_epoch,
    training_state,
)
from model.transforms import eval_transform, train_transform

SIZE = (32, 16)


def test_lr_schedule():
    t = TrainConfig(lr=1.0, warmup_epochs=10, warmup_factor=0.01, milestones=(40, 70), gamma=0.1)
    assert lr_factor(0, t) == pytest.approx(0.01)
    assert lr_factor(5, t) == pytest.approx(0.01 * 0.5 + 0.5)
    assert lr_factor(10, t) == 1.0 and lr_factor(39, t) == 1.0
    assert lr_factor(40, t) == pytest.approx(0.1) and lr_factor(70, t) == pytest.approx(0.01)
    assert lr_factor(3, TrainConfig(warmup_epochs=0, milestones=(2,))) == pytest.approx(0.1)


def _setup(accum=1, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0", num_classes=4, input_size=SIZE)
    tcfg = TrainConfig(accum_steps=accum, warmup_epochs=0, **kw)
    net = build_model(cfg)
    center = CenterLoss(4, cfg.embedding_dim)
    opt, copt = build_optimizers(net, center, tcfg)
    return net, center, opt, copt, tcfg


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, *SIZE, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
            for _ in range(n)]


def test_accumulation_steps_and_frozen_bias():
    net, center, opt, copt, tcfg = _setup(accum=2)
    stats = train_epoch(net, center, opt, copt, _batches(3), tcfg, epoch=0)
    assert stats.steps == 3 and stats.images == 24
    assert set(stats.losses) == {"ce", "triplet", "ctl", "center", "total"}
    step_counts = {int(s["step"]) for s in opt.state_dict()["state"].values()}
    assert step_counts == {2}  # 3 batches with accum 2: one full group + the partial tail
    assert torch.count_nonzero(net.bottleneck.bias) == 0


def test_center_update_uses_unweighted_gradient():
    net, center, _, _, tcfg = _setup(center_weight=5e-4, center_lr=0.5)
    x, y = _batches(1)[0]
    before = center.centers.detach().clone()
    net.train()
    feat, _, _ = net(x)
    feat = feat.detach()
    c = before[y]
    grad = torch.zeros_like(before)
    grad.index_add_(0, y, -2 * (feat - c) / len(y))  # d/dc of mean ||f - c||^2
    # a network built with the same seed sees the same features inside train_epoch
    net2, center2, opt2, copt2, _ = _setup(center_weight=5e-4, center_lr=0.5)
    train_epoch(net2, center2, opt2, copt2, [(x, y)], tcfg, epoch=0)
    torch.testing.assert_close(center2.centers.detach(), before - 0.5 * grad, atol=1e-4, rtol=1e-4)


def test_loss_weights_switch_parts_off():
    feat = torch.randn(8, 6)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    t = TrainConfig(ctl_weight=0, center_weight=0)
    total, parts = compute_losses(feat, torch.randn(8, 4), y, CenterLoss(4, 6), t)
    assert set(parts) == {"ce", "triplet"}
    assert total.item() == pytest.approx(float(parts["ce"] + parts["triplet"]), rel=1e-6)


def test_state_round_trip(tmp_path):
    net, center, opt, copt, tcfg = _setup()
    train_epoch(net, center, opt, copt, _batches(1), tcfg, epoch=0)
    state = training_state(net, center, opt, copt, None, epoch=4, config={"a": [1, 2]})
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    net2, center2, opt2, copt2, _ = _setup()
    assert restore_training_state(loaded, net2, center2, opt2, copt2) == 5
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(center.centers, center2.centers)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def _shards(tmp_path, corrupt=None):
    rows = []
    for item in range(4):
        for j in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (16, 32), (60 * item, 20 * j, 100)).save(buf, format="PNG")
            iid = f"train/{item:04d}_{j}.png"
            data = b"broken" if (item, j) == corrupt else buf.getvalue()
            rows.append(({"image_id": iid, "item_id": str(item + 1), "camera_id": j,
                          "split": "train", "path": iid}, data, "png"))
    return index_shards(write_shards(rows, str(tmp_path), "train", shard_size=5))


def test_loader_batches_and_corrupt_image_skipped(tmp_path):
    idx = _shards(tmp_path, corrupt=(1, 2))
    cfg = ModelConfig(backbone="efficientnet_lite0", input_size=SIZE)
    items = eligible_items(idx.item_id)
    plan = plan_epoch(items, 2, 3, 1, 0, seed=0, epoch=0)
    with pytest.warns(UserWarning, match="skipping image"):
        batches = list(BatchLoader(idx, iter_plan_rows(plan), train_transform(cfg), threads=2))
    assert len(batches) == 2
    total = sum(len(b[1]) for b in batches)
    assert total == 11  # 12 images, one corrupt
    for x, y, rows in batches:
        assert x.shape[1:] == (3, *SIZE) and x.dtype == torch.float32
        assert all(sorted(items)[lab] == idx.item_id[r] for lab, r in zip(y.tolist(), rows))
    net = build_model(cfg)
    with pytest.warns(UserWarning):
        rows, emb = embed_rows(net, idx, np.arange(len(idx)), eval_transform(cfg), batch_size=5)
    assert len(rows) == 11 and emb.shape == (11, 1280)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    ShardReader(idx).close()


def test_rmac_pooling_and_ap_loss_train_together():
    """R-MAC head and the AP loss plug into the same training step as CTL; the AP part has a
    gradient that reaches the backbone."""
    import torch

    from model.config import ModelConfig, TrainConfig
    from model.net import build_model
    from model.training import compute_losses

    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone="resnet18", pooling="rmac", num_classes=4, input_size=(64, 32)))
    net.train()
    x, y = torch.randn(8, 3, 64, 32), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    feat, _, logits = net(x)
    total, parts = compute_losses(feat, logits, y, None,
                                  TrainConfig(ap_weight=1.0, ctl_weight=1.0, center_weight=0))
    assert {"ap", "ctl", "ce", "triplet"} <= set(parts)
    assert 0.0 < float(parts["ap"]) <= 1.0
    total.backward()
    assert next(net.backbone.parameters()).grad is not None


def test_global_stats_single_process_is_this_ranks_totals():
    from model.training import EpochStats, global_stats

    stats = EpochStats(losses={"ce": 2.0, "triplet": 0.5}, lr=1e-3, steps=4, images=40, seconds=8.0)
    m = global_stats(stats, skipped=3)
    assert m == {"loss_ce": 2.0, "loss_triplet": 0.5, "lr": 1e-3, "steps": 4, "images": 40,
                 "skipped_images": 3, "epoch_seconds": 8.0, "images_per_s": 5.0}
    zero = global_stats(EpochStats(losses={}, lr=0.1, steps=0, images=0, seconds=0.0), skipped=0)
    assert zero["images_per_s"] == 0.0 and zero["images"] == 0


def test_format_epoch_line():
    from model.training import format_epoch

    m = {"epoch": 3, "loss_ce": 1.23456, "loss_ctl": 0.5, "lr": 3.5e-4, "steps": 10, "images": 640,
         "images_per_s": 80.04, "epoch_seconds": 8.0, "skipped_images": 0}
    assert format_epoch(m) == ("epoch 3: ce=1.2346 ctl=0.5000 lr=3.50e-04 steps=10 images=640 "
                               "80.0 img/s (8.0s)")
    m.update(skipped_images=2, instance_mAP=0.5, instance_rank1=0.75, centroid_mAP=0.6,
             centroid_rank1=0.8)
    assert format_epoch(m).endswith(" skipped=2 | instance mAP=0.5000 R1=0.7500"
                                    " centroid mAP=0.6000 R1=0.8000")
