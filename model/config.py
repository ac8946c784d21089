"""Typed configuration for the network and for training, from YAML plus command-line overrides.

A run is described by one `Config` (sections `model`, `data`, `train`, `run`). It is built
from plain values only: `yaml.safe_load` for files and `key.sub=value` strings for overrides,
each checked against the dataclass field's type, so a config can never import or execute code.
Unknown keys are errors that name the key.

    cfg = load_config("configs/market.yaml", ["train.epochs=30", "model.backbone=resnet18"])
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from model.schedule import SCHEDULES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Width of each backbone's final feature map = the embedding dimension D.
BACKBONE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet50_ibn_a": 2048,
    "efficientnet_lite0": 1280,
}
POOLINGS = ("avg", "max", "gem", "rmac")
# Largest input side: far above any ReID/retrieval input (256x128, 384x192), far below sizes whose
# single test batch would exhaust memory before the first image is embedded.
MAX_INPUT_SIDE = 4096
NECK_FEATS = ("after", "before")  # which side of the BN-neck is the inference embedding


@dataclass
class ModelConfig:
    """The network, everything needed to rebuild it for inference (stored as config.json).

    embedding_dim is derived from the backbone (0 = fill in); a stored value that disagrees
    with the backbone is an error. input_size is (H, W); mean/std are per RGB channel in [0, 1].
    num_classes is the number of training identities (0 = no classifier head, inference only).
    flip_test: embed an image as the mean of its and its horizontal mirror's post-BN features
    (then L2-normalised); it changes every embedding, so it is part of the stored config.
    neck_feat: the inference embedding is the feature after the BN-neck ("after", the strong
    baseline's choice) or the pooled feature before it ("before").
    """

    backbone: str = "resnet50"
    pooling: str = "rmac"          # measured: +0.15 mAP over avg on Market-1501-mini (docs/recipe.md)
    gem_p: float = 3.0
    last_stride: int = 1
    num_classes: int = 0
    input_size: tuple[int, int] = (256, 128)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    embedding_dim: int = 0
    flip_test: bool = True         # embedding = mean of the image's and its mirror's, then L2
    neck_feat: str = "after"       # inference feature: after the BN-neck (DESIGN) or "before" it

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_DIMS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {sorted(BACKBONE_DIMS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose from {list(POOLINGS)}")
        if self.neck_feat not in NECK_FEATS:
            raise ValueError(f"neck_feat must be one of {list(NECK_FEATS)}, got {self.neck_feat!r}")
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not (math.isfinite(self.gem_p) and self.gem_p > 0):
            raise ValueError(f"gem_p must be a finite number > 0, got {self.gem_p}")
        self.input_size = tuple(int(v) for v in self.input_size)
        if len(self.input_size) != 2 or not all(16 <= v <= MAX_INPUT_SIDE for v in self.input_size):
            raise ValueError(f"input_size must be (H, W) with both in [16, {MAX_INPUT_SIDE}], "
                             f"got {self.input_size}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std must have 3 values (R, G, B), got {self.mean}, {self.std}")
        # NaN passes every comparison: check finiteness first, or a NaN mean slips through and
        # turns every image into the same vector
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in self.mean):
            raise ValueError(f"mean must be 3 finite values in [0, 1], got {self.mean}")
        if not all(math.isfinite(v) and v > 0.0 for v in self.std):
            raise ValueError(f"std must be 3 finite values > 0, got {self.std}")
        dim = BACKBONE_DIMS[self.backbone]
        if self.embedding_dim not in (0, dim):
            raise ValueError(f"embedding_dim {self.embedding_dim} does not match backbone "
                             f"{self.backbone} (dim {dim})")
        self.embedding_dim = dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        if isinstance(d, dict):
            # model directories written before test-time flip existed embed without it
            d.setdefault("flip_test", False)
        return from_dict(cls, d, "model")


@dataclass
class DataConfig:
    """Where the WebDataset shards are (local path or any pyarrow URI)."""

    shards: str = ""              # folder holding <split>-NNNNNN.tar
    train_split: str = "train"
    query_split: str = "query"
    gallery_split: str = "gallery"
    # P 8 x M 8 beat DESIGN's 16 x 4 by +0.05 instance / +0.04 centroid mAP over seeds in the
    # 30-minute recipe study (benchmarks/README.md): more images per item, better centroids
    P: int = 8                    # items per batch (per worker)
    M: int = 8                    # images per item
    min_images: int = 2           # items with fewer training images are skipped
    loader_threads: int = 2       # decode/augment threads per worker
    max_pixels: int = 20_000_000  # decode guard against decompression bombs
    crop_pad: int = 10            # train crop: pad by this many pixels, random crop back
    erase_prob: float = 0.5       # train random-erasing probability (0 = off)

    def __post_init__(self) -> None:
        if self.P < 2 or self.M < 2:
            raise ValueError(f"need P >= 2 and M >= 2 for triplet/CTL, got P={self.P}, M={self.M}")
        if self.crop_pad < 0:
            raise ValueError(f"crop_pad must be >= 0, got {self.crop_pad}")
        if not 0.0 <= self.erase_prob <= 1.0:
            raise ValueError(f"erase_prob must be in [0, 1], got {self.erase_prob}")
        if self.min_images < 2:
            raise ValueError("min_images must be >= 2 (an item needs a positive)")
        for split in ("train_split", "query_split", "gallery_split"):
            # the shard file names' rule (model.shards.shard_name): no glob or path characters
            _check(re.fullmatch(r"[A-Za-z0-9_]+", getattr(self, split)) is not None, split,
                   "a name of letters, digits or '_'", getattr(self, split))
        _check(self.loader_threads >= 1, "loader_threads", ">= 1", self.loader_threads)
        _check(self.max_pixels >= 1, "max_pixels", ">= 1", self.max_pixels)


@dataclass
class TrainConfig:
    """Optimisation: losses, schedule, distributed/accelerator options.

    Two ways to size a run. time_budget_s > 0: the epochs are sized to that many seconds of
    training (model/schedule.py; epochs, warmup_epochs and milestones are then unused) and the
    LR follows `schedule` in fractions of the run: warm-up over warmup_frac, then "step"
    (x gamma at each of milestone_fracs) or "cosine". time_budget_s = 0: `epochs` epochs with
    warmup_epochs and x gamma at the epochs in `milestones` (the DESIGN schedule).
    """

    epochs: int = 120
    steps_per_epoch: int = 0      # 0 = one pass over every training item (P items per step)
    # DESIGN's 3.5e-4 is the strong baseline's for one batch of 64; DDP averages 2 workers' batches
    # of 64 (128 images a step), and the recipe study measured 7e-4 above 3.5e-4 over 3 seeds
    lr: float = 7e-4
    weight_decay: float = 5e-4
    warmup_epochs: int = 10
    warmup_factor: float = 0.01   # lr starts at lr * warmup_factor and rises linearly
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    margin: float = 0.5           # triplet and CTL margin
    ce_weight: float = 1.0
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0
    ctl_weight: float = 1.0       # 0 switches CTL off
    ap_weight: float = 0.0        # > 0 adds the listwise AP loss (Revaud et al. 2019)
    ap_bins: int = 20             # histogram bins of the AP loss
    center_weight: float = 5e-4   # 0 switches center loss off
    center_lr: float = 0.5
    accum_steps: int = 1
    amp: bool = True              # used on GPU only
    channels_last: bool = True    # NHWC memory layout (GPU and CPU: faster convs on both)
    seed: int = 0
    pretrained: str = ""          # "", "lite0-imagenet", a state-dict file or a model directory
    eval_every: int = 0           # validate every N epochs (0 = only after the last epoch)
    eval_batch_size: int = 128
    time_budget_s: float = 0.0    # > 0: size the run to this many seconds of training
    schedule: str = "step"        # budget runs: step | cosine
    warmup_frac: float = 0.1      # budget runs: warm-up over this fraction of the run
    milestone_fracs: tuple[float, ...] = (0.7, 0.9)  # budget runs, "step": x gamma here

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        self.milestone_fracs = tuple(float(f) for f in self.milestone_fracs)
        if self.epochs < 1 or self.accum_steps < 1:
            raise ValueError("epochs and accum_steps must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        _check(self.steps_per_epoch >= 0, "steps_per_epoch", ">= 0 (0 = one pass)",
               self.steps_per_epoch)
        _check(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)
        _check(0 < self.warmup_factor <= 1, "warmup_factor", "in (0, 1]", self.warmup_factor)
        _check(all(m >= 0 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
               "milestones", "epochs >= 0 in increasing order", self.milestones)
        _check(self.gamma > 0, "gamma", "> 0", self.gamma)
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)", self.label_smoothing)
        for name in ("weight_decay", "margin", "ce_weight", "triplet_weight", "ctl_weight",
                     "ap_weight", "center_weight"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _check(self.center_lr > 0, "center_lr", "> 0", self.center_lr)
        _check(self.ap_bins >= 2, "ap_bins", ">= 2", self.ap_bins)
        _check(self.eval_every >= -1, "eval_every", ">= -1 (-1 = never, 0 = after the last epoch)",
               self.eval_every)
        _check(self.eval_batch_size >= 1, "eval_batch_size", ">= 1", self.eval_batch_size)
        if not self.time_budget_s >= 0:  # also refuses NaN
            raise ValueError(f"time_budget_s must be >= 0, got {self.time_budget_s}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if any(not 0.0 < f < 1.0 for f in self.milestone_fracs) or \
                list(self.milestone_fracs) != sorted(self.milestone_fracs):
            raise ValueError(f"milestone_fracs must be increasing fractions in (0, 1), got "
                             f"{list(self.milestone_fracs)}")


@dataclass
class RunConfig:
    """Ray Train run: name, storage, workers, fault tolerance, final model output."""

    name: str = "ctl"
    storage_path: str = "outputs/ray_results"
    output: str = ""              # final model directory (default: <storage>/<name>/model)
    num_workers: int = 2
    use_gpu: str = "auto"         # auto | true | false
    gpu_wait_s: float = 600.0     # use_gpu true: wait this long for GPU nodes to join
    cpus_per_worker: int = 1
    max_failures: int = 2
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        self.use_gpu = str(self.use_gpu).lower()
        if self.use_gpu not in ("auto", "true", "false"):
            raise ValueError(f"use_gpu must be auto, true or false, got {self.use_gpu!r}")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        # the name is a folder under storage_path: no separators, nothing that climbs out of it
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None and self.name not in (".", ".."),
               "name", "a name of letters, digits, '.', '_' or '-'", self.name)
        _check(bool(self.storage_path), "storage_path", "a folder or URI", self.storage_path)
        _check(self.cpus_per_worker >= 1, "cpus_per_worker", ">= 1", self.cpus_per_worker)
        _check(0 <= self.gpu_wait_s <= 86400, "gpu_wait_s", "between 0 and 86400 seconds",
               self.gpu_wait_s)
        _check(self.max_failures >= -1, "max_failures", ">= -1 (-1 = retry forever)",
               self.max_failures)
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1", self.keep_checkpoints)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
                          ("run", RunConfig)):
            _check(isinstance(getattr(self, name), cls), name, f"a {cls.__name__}",
                   type(getattr(self, name)).__name__)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_default(cls, name: str) -> Any:
    """The default of dataclass field `name` of `cls` (the one place a default is written)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _check(ok: bool, name: str, wanted: str, got: Any) -> None:
    """Every __post_init__ rejects a bad value the same way: one line naming field and value."""
    if not ok:
        raise ValueError(f"{name} must be {wanted}, got {got!r}")



# ---------------------------------------------------------------- plain values -> dataclasses

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one plain value to the annotated type `tp`; errors name `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config {key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"config {key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"config {key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"config {key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"config {key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"config {key}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config {key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # JSON/YAML NaN and inf parse as floats; no setting means them
            raise ValueError(f"config {key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ValueError(f"config {key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def from_dict(cls, d: dict, prefix: str = ""):
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types raise ValueError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ValueError(f"unknown config key{where}: {unknown[0]!r} (known: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in d.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(base: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML scalars/lists) to a plain dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ValueError(f"override key {key!r} must be section.key (e.g. train.lr)")
        section, name = parts
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ValueError(f"config section {section!r} is not a mapping")  # noqa: TRY004
        out[section][name] = _parse_scalar(text)
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + `section.key=value` overrides -> validated `Config`."""
    import yaml

    raw: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return from_dict(Config, raw)
