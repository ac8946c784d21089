"""pipelines/export.py: ONNX (run by onnxruntime) and TorchScript outputs equal the project's
embeddings to 1e-4 on real Market-1501 images, preprocessed from the JSON contract alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.serving.serving_data import save_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def contract_input(paths, contract) -> np.ndarray:
    """(N, 3, H, W) float32 from image files, following FILE.json only."""
    from PIL import Image

    spec = contract["input"]
    size = (spec["resize"]["width"], spec["resize"]["height"])
    mean, std = np.array(spec["mean"], np.float32), np.array(spec["std"], np.float32)
    out = []
    for p in paths:
        img = Image.open(p).convert(spec["color"]).resize(size, Image.BILINEAR)
        x = (np.asarray(img, np.float32) * np.float32(spec["scale"]) - mean) / std
        out.append(x.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("export") / "model")
    save_tiny_model(d)
    return d


def export(model_dir, fmt, out):
    r = subprocess.run([sys.executable, os.path.join(REPO, "pipelines", "export.py"), "--model", model_dir,
                        "--format", fmt, "--out", str(out)], check=False, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_equals_project_embeddings(model_dir, market_mini, tmp_path, fmt):
    from model.embedding import ModelRunner

    paths = sorted(str(p) for p in (market_mini / "query").glob("*.jpg"))[:6]
    assert paths
    contract = export(model_dir, fmt, tmp_path / f"m.{fmt}")
    x = contract_input(paths, contract)
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run([contract["output"]["name"]], {contract["input"]["name"]: x})[0]
    else:
        import torch

        got = torch.jit.load(str(tmp_path / "m.torchscript")).eval()(torch.from_numpy(x)).detach().numpy()
    runner = ModelRunner(model_dir, device="cpu")
    want = runner.embed_images([Path(p).read_bytes() for p in paths])
    assert want.ok.all() and contract["model"] == runner.model_id
    assert got.shape == want.embeddings.shape == (len(paths), contract["output"]["shape"][1])
    np.testing.assert_allclose(got, want.embeddings, atol=1e-4, rtol=0)


def test_export_bad_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "pipelines", "export.py"), "--model", str(tmp_path),
                        "--format", "onnx", "--out", str(tmp_path / "m.onnx")], check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")
    assert not (tmp_path / "m.onnx").exists()
