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


@pytest.mark.parametrize("cls, kwargs, match", [
    ("DataConfig", {"loader_threads": 0}, "loader_threads must be >= 1, got 0"),
    ("DataConfig", {"max_pixels": 0}, "max_pixels must be >= 1"),
    ("DataConfig", {"query_split": "q*"}, "query_split must be a name"),
    ("TrainConfig", {"steps_per_epoch": -1}, "steps_per_epoch must be >= 0"),
    ("TrainConfig", {"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ("TrainConfig", {"warmup_factor": 0.0}, "warmup_factor must be in (0, 1]"),
    ("TrainConfig", {"milestones": (70, 40)}, "milestones must be epochs >= 0 in increasing order"),
    ("TrainConfig", {"gamma": 0.0}, "gamma must be > 0"),
    ("TrainConfig", {"label_smoothing": 1.0}, "label_smoothing must be in [0, 1)"),
    ("TrainConfig", {"margin": -0.1}, "margin must be >= 0"),
    ("TrainConfig", {"ctl_weight": -1.0}, "ctl_weight must be >= 0"),
    ("TrainConfig", {"center_lr": 0.0}, "center_lr must be > 0"),
    ("TrainConfig", {"ap_bins": 1}, "ap_bins must be >= 2"),
    ("TrainConfig", {"eval_every": -2}, "eval_every must be >= -1"),
    ("TrainConfig", {"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ("RunConfig", {"name": "a/b"}, "name must be a name"),
    ("RunConfig", {"name": ".."}, "name must be a name"),
    ("RunConfig", {"storage_path": ""}, "storage_path must be a folder or URI"),
    ("RunConfig", {"cpus_per_worker": 0}, "cpus_per_worker must be >= 1"),
    ("RunConfig", {"max_failures": -2}, "max_failures must be >= -1"),
    ("RunConfig", {"keep_checkpoints": 0}, "keep_checkpoints must be >= 1"),
])
def test_dataclasses_reject_bad_values_on_construction(cls, kwargs, match):
    from model import config

    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("*", r"\*")) as e:
        getattr(config, cls)(**kwargs)
    assert "\n" not in str(e.value)


def test_config_sections_must_be_their_dataclasses():
    from model.config import TrainConfig

    with pytest.raises(ValueError, match="model must be a ModelConfig, got 'TrainConfig'"):
        Config(model=TrainConfig())


def test_field_default_reads_the_dataclass():
    from model.config import DataConfig, TrainConfig, field_default

    assert field_default(DataConfig, "P") == DataConfig().P
    assert field_default(TrainConfig, "milestones") == TrainConfig().milestones
    assert field_default(Config, "model") == ModelConfig()
    with pytest.raises(KeyError, match="no field 'nope'"):
        field_default(TrainConfig, "nope")
