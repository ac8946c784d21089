"""Images and networks: dataset ingest, shards, backbones, losses, sampling, checkpoints.

Never imports `index`, `pipelines` or `cluster`. The public names below resolve on first use
(PEP 562), so `import model` stays light (no torch) and `model.build_model` imports only what
it needs:

    import model
    cfg = model.load_config(None, ["model.backbone=resnet18"])
    net = model.build_model(cfg.model)
"""
from __future__ import annotations

import importlib

# public name -> the module that defines it
_NAMES = {
    # configuration
    "Config": "model.config", "ModelConfig": "model.config", "DataConfig": "model.config",
    "TrainConfig": "model.config", "RunConfig": "model.config", "load_config": "model.config",
    # the network and its parts
    "ReIDNet": "model.net", "build_model": "model.net",
    "build_pooling": "model.pooling", "GeM": "model.pooling", "RMAC": "model.pooling",
    "build_backbone": "model.backbones",
    "CenterLoss": "model.losses", "batch_hard_triplet": "model.losses",
    "centroid_triplet": "model.losses", "label_smoothed_ce": "model.losses",
    "APLoss": "model.ap_loss",
    # model directories (model.pt + config.json)
    "save_model": "model.checkpoint", "load_model": "model.checkpoint",
    "read_model_id": "model.checkpoint", "model_id": "model.checkpoint",
    "load_pretrained": "model.checkpoint",
    # images
    "decode_image": "model.transforms", "upright_rgb": "model.transforms",
    "ImageDecodeError": "model.transforms", "eval_transform": "model.transforms",
    "train_transform": "model.transforms",
    # datasets and shards
    "scan_dataset": "model.ingest", "build_dataset": "model.ingest",
    "SyntheticConfig": "model.synthetic", "write_dataset": "model.synthetic",
    "write_shards": "model.shards", "iter_shard_samples": "model.shards",
    "list_shards": "model.shards",
    # training without Ray
    "index_shards": "model.sampler", "plan_epoch": "model.sampler",
    "BatchLoader": "model.data", "embed_rows": "model.data",
    "prepare_data": "model.train_data", "train_epoch": "model.training",
    # embedding (Ray Data runs these in pipelines/embed.py)
    "ModelRunner": "model.embedding", "embed_sample_table": "model.embedding",
}
# whole modules offered as attributes, e.g. `model.losses.batch_hard_triplet`
_MODULES = ("losses",)

__all__ = [
    "RMAC",
    "APLoss",
    "BatchLoader",
    "CenterLoss",
    "Config",
    "DataConfig",
    "GeM",
    "ImageDecodeError",
    "ModelConfig",
    "ModelRunner",
    "ReIDNet",
    "RunConfig",
    "SyntheticConfig",
    "TrainConfig",
    "batch_hard_triplet",
    "build_backbone",
    "build_dataset",
    "build_model",
    "build_pooling",
    "centroid_triplet",
    "decode_image",
    "embed_rows",
    "embed_sample_table",
    "eval_transform",
    "index_shards",
    "iter_shard_samples",
    "label_smoothed_ce",
    "list_shards",
    "load_config",
    "load_model",
    "load_pretrained",
    "losses",
    "model_id",
    "plan_epoch",
    "prepare_data",
    "read_model_id",
    "save_model",
    "scan_dataset",
    "train_epoch",
    "train_transform",
    "upright_rgb",
    "write_dataset",
    "write_shards",
]


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"model.{name}")
    if name not in _NAMES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value  # resolved once; later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
