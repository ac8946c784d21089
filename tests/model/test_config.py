"""Config: YAML + overrides into typed dataclasses, errors that name the key."""
import pytest

from model.config import Config, ModelConfig, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbone: efficientnet_lite0\n  input_size: [128, 64]\n"
                 "train:\n  epochs: 5\n  milestones: [2, 4]\n")
    cfg = load_config(str(p), ["train.lr=1e-4", "data.P=8", "train.amp=false",
                               "model.pooling=gem"])
    assert isinstance(cfg, Config)
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.model.embedding_dim == 1280
    assert cfg.model.input_size == (128, 64) and cfg.model.pooling == "gem"
    assert cfg.train.epochs == 5 and cfg.train.milestones == (2, 4)
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.amp is False and cfg.data.P == 8
    assert load_config().model == ModelConfig()


@pytest.mark.parametrize("override, match", [
    ("train.lrr=1", "unknown config key in train: 'lrr'"),
    ("nosection.x=1", "unknown config key: 'nosection'"),
    ("train.epochs=abc", "train.epochs: expected an integer"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("model.backbone=vgg16", "unknown backbone"),
    ("model.input_size=[1,2,3]", "expected 2 values"),
    ("train.amp=maybe", "expected true/false"),
    ("lr=1", "must be section.key"),
    ("train.lr", "section.key=value"),
    ("model.embedding_dim=17", "does not match backbone"),
])
def test_bad_values_name_the_problem(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_yaml_cannot_construct_objects(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(p))
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "absent.yaml"))


def test_model_config_json_round_trip():
    cfg = ModelConfig(backbone="resnet34", num_classes=3, input_size=(96, 48))
    assert ModelConfig.from_json(cfg.to_json()) == cfg
