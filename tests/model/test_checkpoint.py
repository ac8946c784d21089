"""Model directory format: round trip, stable id, atomic replace, clear errors."""
import json
import os
import re

import pytest
import torch

import model.checkpoint as ckpt
from model.checkpoint import build_model, load_model, save_model
from model.config import ModelConfig


def _net(num_classes=4, backbone="efficientnet_lite0"):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, num_classes=num_classes, input_size=(64, 32),
                      pooling="gem")
    net = build_model(cfg)
    net.train()(torch.randn(4, 3, 64, 32))  # move BN running stats off their defaults
    return net, cfg


def test_round_trip_same_embeddings_and_stable_id(tmp_path):
    net, cfg = _net()
    out = tmp_path / "model"
    mid = save_model(net, cfg, str(out))
    assert sorted(os.listdir(out)) == ["config.json", "model.pt"]
    assert re.fullmatch(r"[0-9a-f]{16}", mid)
    sd = torch.load(out / "model.pt", weights_only=True)
    assert set(sd) == set(net.state_dict())
    assert ModelConfig(**json.loads((out / "config.json").read_text())) == cfg
    loaded, cfg2, mid2 = load_model(str(out))
    assert cfg2 == cfg and mid2 == mid and not loaded.training
    x = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(loaded(x), net.eval()(x))
    assert load_model(str(out))[2] == mid  # id depends on the file only


def test_save_replaces_and_failure_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path / "model"
    net1, cfg = _net()
    id1 = save_model(net1, cfg, str(out))
    net2, _ = _net()
    with torch.no_grad():
        net2.bottleneck.weight.mul_(2)
    id2 = save_model(net2, cfg, str(out))
    assert id2 != id1 and load_model(str(out))[2] == id2

    def boom(src, target):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "replace_dir", boom)
    with pytest.raises(OSError):
        save_model(net1, cfg, str(out))
    assert load_model(str(out))[2] == id2
    assert sorted(os.listdir(tmp_path)) == ["model"]  # temporary directory removed


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "absent"))
    net, cfg = _net()
    out = tmp_path / "m"
    save_model(net, cfg, str(out))
    (out / "model.pt").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read model.pt"):
        load_model(str(out))
    save_model(net, cfg, str(out))
    other = ModelConfig(backbone="efficientnet_lite0", num_classes=9, input_size=(64, 32), pooling="gem")
    (out / "config.json").write_text(other.to_json())
    with pytest.raises(ValueError, match="does not fit"):
        load_model(str(out))
    (out / "config.json").write_text('{"backbone": "vgg"}')
    with pytest.raises(ValueError, match="unknown backbone"):
        load_model(str(out))


def test_ddp_wrapped_module_saved_unwrapped(tmp_path):
    net, cfg = _net()

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    save_model(Wrapper(net), cfg, str(tmp_path / "m"))
    sd = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)
