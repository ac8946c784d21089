"""What a training run reads before it starts: the shard indexes and the eligible items.

Indexes the <split>-NNNNNN.tar shards (tar headers and JSON rows only, no image is decoded)
so that pipelines/train.py can hand them to every Ray Train worker; tests call it directly.
"""
from __future__ import annotations

import os

from model.config import Config

__all__ = ["prepare_data"]


def prepare_data(cfg: Config) -> dict:
    """Index the shards of `cfg.data` and fix which training items take part.

    Returns {"train_index": SampleIndex, "items": {item_id: int64 row indices}, "eval": bool}
    plus "query_index"/"gallery_index" (SampleIndex) when validation runs (eval_every >= 0 and
    both splits have shards). Shard URLs are made absolute: Ray workers do not run in this
    process's directory. Raises ValueError / FileNotFoundError naming what is missing.
    """
    from model.sampler import eligible_items, index_shards
    from model.shards import list_shards

    if not cfg.data.shards:
        raise ValueError("no shards given (--shards or data.shards)")

    def urls(split):
        return [u if "://" in u else os.path.abspath(u)
                for u in list_shards(cfg.data.shards, split)]

    train_urls = urls(cfg.data.train_split)
    if not train_urls:
        raise FileNotFoundError(f"no {cfg.data.train_split}-NNNNNN.tar shards in {cfg.data.shards}")
    train_index = index_shards(train_urls)
    items = eligible_items(train_index.item_id, cfg.data.min_images)
    n_all = len(set(train_index.item_id.tolist()))
    print(f"train: {len(train_index)} images, {n_all} items, {len(items)} with >= "
          f"{cfg.data.min_images} images ({n_all - len(items)} skipped)", flush=True)
    need = cfg.data.P * cfg.run.num_workers
    if len(items) < need:
        raise ValueError(f"need at least P x num_workers = {need} training items, have {len(items)}")
    out = {"train_index": train_index, "items": items, "eval": False}
    if cfg.train.eval_every >= 0:
        try:
            q, g = urls(cfg.data.query_split), urls(cfg.data.gallery_split)
        except FileNotFoundError:
            q, g = [], []
        if q and g:
            out.update(eval=True, query_index=index_shards(q), gallery_index=index_shards(g))
            print(f"validation: {len(out['query_index'])} query, "
                  f"{len(out['gallery_index'])} gallery images", flush=True)
        else:
            print("validation skipped: no query/gallery shards", flush=True)
    return out
