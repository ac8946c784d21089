"""A tiny gallery for the serving tests: random-weight resnet18 (32x16 input), 12 JPEG gallery
images of 4 items on disk, their embeddings (embedded by the project's own ModelRunner), and a
published index that records the model directory."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Gallery:
    root: str          # dataset root: image_id = path relative to it
    model_dir: str
    embeddings: str
    index_root: str
    name: str

    @property
    def index(self) -> str:
        return os.path.join(self.index_root, self.name)


def jpeg(seed: int, size=(48, 24)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, 1, 3))
    arr = np.clip(base + rng.integers(-30, 30, (size[0], size[1], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def save_tiny_model(directory: str) -> str:
    import torch

    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    return save_model(build_model(cfg).eval(), cfg, directory)


def embed_files(model_dir: str, root: str, image_ids: list[str], items: list[str], out: str,
                camera: int = 1) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from contracts.vectors import embeddings_schema
    from model.embedding import ModelRunner

    runner = ModelRunner(model_dir, device="cpu")
    data = [Path(root, i).read_bytes() for i in image_ids]
    res = runner.embed_images(data)
    assert res.ok.all()
    schema = embeddings_schema(runner.dim, runner.model_id)
    flat = pa.array(res.embeddings.reshape(-1), pa.float32())
    table = pa.table([pa.array(image_ids, pa.string()), pa.array(items, pa.string()),
                      pa.array([camera] * len(items), pa.int32()), pa.array(["gallery"] * len(items), pa.string()),
                      pa.FixedSizeListArray.from_arrays(flat, runner.dim)], schema=schema)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    pq.write_table(table, out)


def make_gallery(tmp: str, n_items: int = 4, per_item: int = 3, name: str = "g") -> Gallery:
    from index.ann.build import BuildConfig, build_index

    root = os.path.join(tmp, "data")
    ids, items = [], []
    for it in range(n_items):
        os.makedirs(os.path.join(root, f"item{it}"), exist_ok=True)
        for j in range(per_item):
            rel = f"item{it}/{j}.jpg"
            with open(os.path.join(root, rel), "wb") as f:
                f.write(jpeg(100 * it + j))
            ids.append(rel)
            items.append(str(it + 1))
    model_dir = os.path.join(tmp, "model")
    save_tiny_model(model_dir)
    emb = os.path.join(tmp, "emb", "part-0.parquet")
    embed_files(model_dir, root, ids, items, emb)
    index_root = os.path.join(tmp, "indexes")
    build_index(emb, index_root, name, BuildConfig(index_type="flat", eval_queries=4),
                progress=lambda m: None, model_dir=model_dir)
    return Gallery(root, model_dir, emb, index_root, name)
