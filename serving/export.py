"""The embedding model as one file for serving elsewhere: ONNX or TorchScript, plus its
preprocessing contract in a JSON beside it (FILE.json).

The exported graph is the network followed by L2-normalisation, so its output equals the
project's embeddings (model.embedding: the BN-neck feature, normalised). Input: a float32 batch
(N, 3, H, W), RGB, resized to the model's input size (bilinear), scaled to [0, 1], then
normalised by the mean/std in the JSON, exactly as model.transforms.BatchEvalTransform does.
Both files are written to temporary names and renamed complete.
"""
from __future__ import annotations

import json
import os

__all__ = ["FORMATS", "export_model", "preprocessing_contract"]

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "images", "embedding"


def preprocessing_contract(cfg, model_id: str, fmt: str) -> dict:
    """What a consumer must do to an image before the exported graph (and what comes out)."""
    h, w = (int(v) for v in cfg.input_size)
    return {
        "model": model_id, "format": fmt, "backbone": cfg.backbone,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, h, w], "dtype": "float32", "layout": "NCHW",
                  "color": "RGB", "resize": {"height": h, "width": w, "interpolation": "bilinear"},
                  "scale": 1 / 255, "mean": list(cfg.mean), "std": list(cfg.std),
                  "formula": "((pixel / 255) - mean) / std per channel"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", int(cfg.embedding_dim) or None], "dtype": "float32",
                   "normalized": True, "similarity": "inner product (cosine)",
                   "flip_test": bool(getattr(cfg, "flip_test", False))},
    }


def _normalised(net, flip: bool):
    """The net with what embedding adds after it: test-time flip (the mean of the image's and
    its mirror's outputs, as model.embedding.forward_embeddings does) and L2-normalisation."""
    import torch

    class Normalised(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            if flip:
                y = (y + self.inner(x.flip(-1))) * 0.5
            return torch.nn.functional.normalize(y, dim=1)

    return Normalised(net).eval()


def export_model(model_dir: str, fmt: str, out: str) -> dict:
    """Export `model_dir` as `fmt` to `out` (+ out.json). Returns the contract written."""
    import torch

    from model.checkpoint import load_model

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    net, cfg, model_id = load_model(model_dir)
    wrapped = _normalised(net, bool(getattr(cfg, "flip_test", False)))
    h, w = (int(v) for v in cfg.input_size)
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dim = int(wrapped(example).shape[1])
    contract = preprocessing_contract(cfg, model_id, fmt)
    contract["output"]["shape"] = ["N", dim]
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        if fmt == "torchscript":
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(wrapped, example), tmp)
        else:
            with torch.no_grad():
                torch.onnx.export(wrapped, (example,), tmp, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=17, dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}})
        with open(tmp + ".json", "w") as f:
            json.dump(contract, f, indent=2)
        os.replace(tmp, out)
        os.replace(tmp + ".json", out + ".json")
    finally:
        for p in (tmp, tmp + ".json"):
            if os.path.exists(p):
                os.remove(p)
    return contract
