"""pipelines/embed.py on Ray: tiny model over synthetic shards with a corrupt image; incremental
runs recompute exactly the new/changed images; bad input exits 2 with one line."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
CORRUPT = 7


def jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def gallery(n=30, changed=(), removed=(), added=0):
    """(row, bytes, ext) samples; `changed` images get other bytes, `added` new images at the end."""
    out = []
    for i in range(n + added):
        if i in removed:
            continue
        row = {"image_id": f"bounding_box_test/{i // 3:04d}_c{i % 3 + 1}s1_{i:06d}.jpg",
               "item_id": str(i // 3), "camera_id": i % 3 + 1, "split": "gallery", "path": f"g/{i}.jpg"}
        data = b"\xff\xd8 truncated" if i == CORRUPT else jpeg(i + (1000 if i in changed else 0))
        out.append((row, data, "jpg"))
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(build_model(cfg).eval(), cfg, str(d))
    return str(d)


def write(samples, d: Path) -> Path:
    from model.shards import write_shards

    write_shards(samples, str(d), "gallery", shard_size=12)
    return d


def reference(model_dir, samples):
    from model.embedding import ModelRunner

    runner = ModelRunner(model_dir, device="cpu", threads=1, decode_threads=1)
    res = runner.embed_images([b for _, b, _ in samples])
    return {r["image_id"]: e for (r, _, _), e, ok in zip(samples, res.embeddings, res.ok) if ok}


def read_out(d: Path):
    from contracts.vectors import read_vectors

    v = read_vectors(str(d), kind="embeddings")
    return dict(zip(v.image_ids, v.vectors)), v, json.loads((d / "_embed.json").read_text())


@pytest.mark.slow
def test_embed_shards_then_incremental(tmp_path, tiny_model, ray_local):
    from pipelines.embed import main

    first = gallery()
    write(first, tmp_path / "s1")
    out1 = tmp_path / "emb1"
    common = ["--model", tiny_model, "--batch-size", "8", "--threads", "1", "--decode-threads", "1"]
    assert main([*common, "--shards", str(tmp_path / "s1"), "--out", str(out1), "--split", "gallery"]) == 0
    got, v, summary = read_out(out1)
    ref = reference(tiny_model, first)
    assert len(got) == len(first) - 1 == summary["embedded"] and summary["carried"] == 0
    assert set(got) == set(ref)
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() < 1e-4
    from model.checkpoint import load_model

    assert v.meta.model == load_model(tiny_model)[2] and v.meta.dim == 512
    assert v.table.column("camera_id").to_pylist()[0] in (1, 2, 3)
    errors = pq.read_table(out1 / "_errors.parquet").to_pylist()
    assert len(errors) == 1 and errors[0]["image_id"] == first[CORRUPT][0]["image_id"]
    assert "undecodable" in errors[0]["reason"]

    # night 2: two images change, one is removed, two are new -> exactly 4 go through the model
    second = gallery(changed=(3, 11), removed=(20,), added=2)
    write(second, tmp_path / "s2")
    out2 = tmp_path / "emb2"
    assert main([*common, "--shards", str(tmp_path / "s2"), "--out", str(out2),
                 "--incremental", str(out1)]) == 0
    got2, _, summary2 = read_out(out2)
    ref2 = reference(tiny_model, second)
    assert summary2["embedded"] == 4 + 0  # changed 3, 11 and new 30, 31 (the corrupt one fails again)
    assert summary2["carried"] == len(second) - 1 - 4 and summary2["errors"] == 1
    assert set(got2) == set(ref2)
    for k in ref2:
        assert np.abs(got2[k] - ref2[k]).max() < 1e-4
    changed_ids = {second[i][0]["image_id"] for i in range(len(second)) if second[i][0]["path"] in ("g/3.jpg", "g/11.jpg")}
    for k in changed_ids:
        assert np.abs(got2[k] - got[k]).max() > 1e-3  # really recomputed from the new bytes


@pytest.mark.slow
def test_embed_from_manifest_with_missing_file(tmp_path, tiny_model, ray_local):
    from contracts.manifest import make_manifest_table, write_manifest
    from pipelines.embed import main

    rows = []
    for i in range(6):
        row = {"image_id": f"g/{i}.jpg", "item_id": str(i // 2), "camera_id": None, "split": "gallery",
               "path": f"g/{i}.jpg"}
        rows.append(row)
        if i != 4:
            (tmp_path / "data" / "g").mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / "g" / f"{i}.jpg").write_bytes(jpeg(i))
    write_manifest(make_manifest_table(rows), str(tmp_path / "manifest.parquet"))
    assert main(["--model", tiny_model, "--manifest", str(tmp_path / "manifest.parquet"),
                 "--root", str(tmp_path / "data"), "--out", str(tmp_path / "emb"), "--threads", "1"]) == 0
    _, v, summary = read_out(tmp_path / "emb")
    assert summary["embedded"] == 5 and v.camera_ids is None
    errors = pq.read_table(tmp_path / "emb" / "_errors.parquet").to_pylist()
    assert [e["image_id"] for e in errors] == ["g/4.jpg"] and errors[0]["reason"].startswith("unreadable file")


def run(*args):
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "embed.py"), *args],
                          check=False, capture_output=True, text=True, timeout=120)


def run_inprocess(capsys, *args):
    """The job's own entry point (run_main) in this process: (exit status, stderr)."""
    from pipelines._cli import run_main
    from pipelines.embed import main

    with pytest.raises(SystemExit) as e:
        run_main(main, list(args))
    return e.value.code, capsys.readouterr().err


def test_bad_inputs_exit_2(tmp_path, tiny_model, capsys):
    r = run("--model", str(tmp_path / "nope"), "--shards", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr
    code, err = run_inprocess(capsys, "--model", tiny_model, "--shards", str(tmp_path / "*.tar"),
                              "--out", str(tmp_path / "o"))
    assert code == 2 and "no shards" in err and err.count("\n") == 1
    code, err = run_inprocess(capsys, "--model", tiny_model, "--manifest", "m.parquet", "--out", "o")
    assert code == 2 and "--root" in err
    code, err = run_inprocess(capsys, "--model", tiny_model, "--shards", "x", "--out", "o", "--bogus")
    assert code == 2 and "bogus" in err
    assert not (tmp_path / "o").exists()


def test_plan_actors_without_ray():
    from pipelines.embed import plan_actors

    # a share of one CPU or more is whole (cpu_actor_share): 3, not 3.5, so reading tasks fit
    assert plan_actors({"CPU": 8}, "auto", 0, 0) == (False, 2, 4, {"num_cpus": 3.0})
    assert plan_actors({"CPU": 2}, "auto", 0, 0) == (False, 1, 2, {"num_cpus": 1.0})
    assert plan_actors({"CPU": 16, "GPU": 2}, "auto", 0, 0) == (True, 2, 8, {"num_gpus": 1, "num_cpus": 1})
    assert plan_actors({"CPU": 16, "GPU": 2}, "cpu", 1, 3)[:3] == (False, 1, 3)
    with pytest.raises(RuntimeError, match="no GPU"):
        plan_actors({"CPU": 4}, "cuda", 0, 0)
