"""Bad images through make_shards and through embed's reading + model stage: every one is
recorded with a reason, the run is not stopped, memory stays bounded (the peak RSS of the
child process, from os.wait4, far below what decoding a 20,000 x 20,000 bomb would take).

Already covered elsewhere: tests/model/test_ingest.py (check_image on corrupt / zero-byte /
non-image / header-only bomb), tests/model/test_shards.py (truncated shard in the reader),
tests/pipelines/test_embed.py (one corrupt JPEG and a missing file through the Ray job).
The Ray embed job with all of these is in test_ray_jobs.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.faults.images import bad_images, jpeg, png_bomb

REPO = Path(__file__).resolve().parents[2]
# A decoded 20,000 x 20,000 RGB bomb alone is 1.2 GB (PIL keeps 4 bytes a pixel: 1.6 GB), the
# 12,000 x 12,000 one 576 MB. Bounds: the whole child (torch alone is ~500 MB), and the growth
# of embed's peak over a warm-up on good images (decoding either bomb would exceed it).
RSS_LIMIT_MB = 1500
GROWTH_LIMIT_MB = 250


def _vm_hwm_mb(pid: int) -> float | None:
    """The process's own peak RSS (VmHWM) in MB, or None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_measured(cmd, tmp_path, timeout=300):
    """Run cmd; return (exit status, stdout, stderr, peak RSS in MB of that child).

    Peak RSS is the child's own VmHWM, polled while it runs: ru_maxrss of a forked child starts
    from the forking (pytest) process's size, which late in a full test run is over 1 GB and
    says nothing of the child. Where /proc is missing, ru_maxrss via os.wait4 is used."""
    import time

    peak = None
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        deadline = time.monotonic() + timeout
        while True:
            hwm = _vm_hwm_mb(p.pid)
            if hwm is not None:
                peak = max(peak or 0.0, hwm)
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)
    rss_mb = peak if peak is not None else usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return p.returncode, (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text(), rss_mb


def test_png_bomb_is_a_valid_huge_png():
    import io
    import struct

    from PIL import Image

    small = png_bomb(160, 160)  # the same construction, small enough to decode here
    im = Image.open(io.BytesIO(small))
    im.load()
    assert im.size == (160, 160) and im.getextrema() == ((0, 0), (0, 0), (0, 0))
    big = png_bomb()
    assert len(big) < 2_000_000
    assert struct.unpack(">II", big[16:24]) == (20_000, 20_000)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """ROOT/<item>/<image>: 4 items of 3 good JPEGs, plus every bad kind in item folders."""
    root = tmp_path_factory.mktemp("bad") / "root"
    for item in range(4):
        (root / f"{item:03d}").mkdir(parents=True)
        for j in range(3):
            (root / f"{item:03d}" / f"{j}.jpg").write_bytes(jpeg(10 * item + j))
    for i, (name, data) in enumerate(sorted(bad_images().items())):
        (root / f"{i % 4:03d}" / f"bad-{name}").write_bytes(data)
    return root


def test_make_shards_records_bad_images_and_stays_small(bad_folder, tmp_path):
    out = tmp_path / "out"
    code, stdout, err, rss = run_measured(
        [sys.executable, "pipelines/make_shards.py", "--format", "folders", "--root", str(bad_folder),
         "--out", str(out), "--workers", "2", "--shard-size", "4"], tmp_path)
    assert code == 0, err
    rejected = {r["path"]: r["reason"] for r in pq.read_table(out / "rejected.parquet").to_pylist()}
    reasons = {p.split("bad-", 1)[1]: r for p, r in rejected.items()}
    assert set(reasons) == set(bad_images()), rejected
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["corrupt.jpg"].startswith("cannot decode") and reasons["garbled.jpg"].startswith("cannot decode")
    assert reasons["bomb20k.png"].startswith("too large") and reasons["bomb12k.png"].startswith("too large: 12000x12000")
    assert pq.read_table(out / "manifest.parquet").num_rows == 12
    assert f"rejected {len(bad_images())}" in stdout
    print(f"make_shards with {len(bad_images())} bad images: peak RSS {rss:.0f} MB")
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"


EMBED_CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from model.embedding import EmbedBatch, samples_from_shards, split_embedded

def peak_mb():
    # this process's own peak (VmHWM); ru_maxrss would include the forking parent's size
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

stage = EmbedBatch(sys.argv[2], device="cpu", threads=1, decode_threads=2)
good, errors = [], {}
def run(urls):
    for t in samples_from_shards(urls, chunk=4):
        ok, errs, _ = split_embedded(stage(t))
        good.extend(ok.column("image_id").to_pylist())
        errors.update(zip(errs.column("image_id").to_pylist(), errs.column("reason").to_pylist()))
run([sys.argv[3]])  # warm-up on good images only: the model's own working memory
warm = peak_mb()
good.clear()
run(sys.argv[4:])
print(json.dumps({"good": good, "errors": errors, "warm_mb": warm, "peak_mb": peak_mb()}))
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(build_model(cfg).eval(), cfg, str(d))
    return str(d)


def gallery_samples():
    """(row, bytes, ext): 8 good images and every bad kind, gallery split."""
    samples = []
    for i in range(8):
        samples.append(({"image_id": f"g/{i:04d}.jpg", "item_id": str(i // 2), "camera_id": i % 2 + 1,
                         "split": "gallery", "path": f"g/{i:04d}.jpg"}, jpeg(i), "jpg"))
    for name, data in sorted(bad_images().items()):
        samples.append(({"image_id": f"g/bad-{name}", "item_id": "9", "camera_id": 1, "split": "gallery",
                         "path": f"g/bad-{name}"}, data, name.rsplit(".", 1)[1]))
    return sorted(samples, key=lambda s: s[0]["image_id"])


def test_embed_stage_records_bad_images_truncated_shard_and_stays_small(tiny_model, tmp_path):
    """embed's own reading and model stage (what each Ray actor runs), in a child process."""
    import tarfile

    from model.shards import key_for, write_shards

    samples = gallery_samples()
    urls = write_shards(samples, str(tmp_path / "shards"), "gallery", shard_size=100)
    # a second shard cut in the middle of its 3rd image
    extra = [({**r, "image_id": r["image_id"].replace("g/", "t/")}, b, e) for r, b, e in samples[:5]
             if b and not r["image_id"].startswith("g/bad")]
    (cut_url,) = write_shards(extra, str(tmp_path / "cut"), "gallery", shard_size=100)
    with tarfile.open(cut_url) as t:
        cut = t.getmember(key_for(extra[2][0]["image_id"]) + ".jpg").offset_data + 50
    data = Path(cut_url).read_bytes()
    Path(cut_url).write_bytes(data[:cut])

    (warm_url,) = write_shards([x for x in samples if not x[0]["image_id"].startswith("g/bad")],
                               str(tmp_path / "warm"), "gallery", shard_size=100)
    code, out, err, rss = run_measured([sys.executable, "-c", EMBED_CHILD, str(REPO), tiny_model, warm_url,
                                        *urls, cut_url], tmp_path)
    assert code == 0, err[-2000:]
    res = json.loads(out.strip().splitlines()[-1])
    good, errors = set(res["good"]), res["errors"]
    assert good == {r["image_id"] for r, b, _ in samples if not r["image_id"].startswith("g/bad")} | \
        {extra[0][0]["image_id"], extra[1][0]["image_id"]}
    bad = {k.split("bad-", 1)[1]: v for k, v in errors.items() if "bad-" in k}
    assert set(bad) == set(bad_images())
    assert bad["empty.jpg"] == "empty image bytes"
    for name in ("corrupt.jpg", "garbled.jpg", "notes.jpg", "bomb20k.png", "bomb12k.png"):
        assert bad[name].startswith("undecodable image"), (name, bad[name])
    assert "exceeds the limit" in bad["bomb12k.png"] or "pixels" in bad["bomb12k.png"]
    assert errors[cut_url].startswith("unreadable shard"), errors
    print(f"embed stage: peak RSS {rss:.0f} MB (child), {res['warm_mb']:.0f} MB after the good-image "
          f"warm-up, {res['peak_mb']:.0f} MB after the bad images")
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"
    assert res["peak_mb"] - res["warm_mb"] < GROWTH_LIMIT_MB, res


def test_model_nan_output_is_an_error_row_never_written():
    """A model that returns NaN/inf for one image: that image is an error row, the others are
    embedded (no NaN ever reaches the embeddings file)."""
    torch = pytest.importorskip("torch")
    import pyarrow as pa

    from model.embedding import ModelRunner, embed_sample_table, sample_table, split_embedded
    from model.transforms import decode_image

    class Net(torch.nn.Module):
        def forward(self, x):  # image 1 -> NaN, image 2 -> inf, others finite
            y = x.mean(dim=(2, 3)).repeat(1, 3) + 1.0
            y[1, 0] = float("nan")
            y[2, 4] = float("inf")
            return y

    runner = ModelRunner.__new__(ModelRunner)
    runner.net, runner.device, runner.dim, runner.pool, runner.collate = Net().eval(), "cpu", 9, None, None
    runner.decode = decode_image
    runner.transform = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1).copy())
    rows = [{"image_id": f"g/{i}.jpg", "item_id": "1", "camera_id": 1, "split": "gallery"} for i in range(4)]
    t = embed_sample_table(runner, sample_table(rows, [jpeg(i) for i in range(4)]))
    good, errors, _ = split_embedded(t)
    assert good.column("image_id").to_pylist() == ["g/0.jpg", "g/3.jpg"]
    assert errors.to_pylist() == [{"image_id": "g/1.jpg", "reason": "model produced NaN/inf embedding"},
                                  {"image_id": "g/2.jpg", "reason": "model produced NaN/inf embedding"}]
    emb = good.column("embedding").combine_chunks()
    assert isinstance(emb, pa.FixedSizeListArray)
    assert np.isfinite(emb.flatten().to_numpy()).all()
