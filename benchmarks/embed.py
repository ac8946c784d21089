"""Embedding benchmark: pipelines/embed.py (Ray Data, actor pool) vs the same model's raw forward.

    python benchmarks/embed.py                                  # resnet50, 256x128, 512 images
    python benchmarks/embed.py --backbone resnet18 --images 256 # quicker

Makes Market-1501-like JPEGs (64x128, smooth random content) in WebDataset shards and a model
directory with random weights (speed does not depend on the weights), then in one run:
  raw       this process: the images decoded and transformed beforehand (not timed), then only
            the forward pass + L2-normalise in batches of --batch-size with --threads torch
            threads, exactly the call the pipeline's actors make (model.embedding.forward_embeddings);
  pipeline  python pipelines/embed.py over the shards: reading tasks, one actor (--actors) with
            the same batch size and torch threads, decoding its own images. Its steady rate is
            images / (last model call's end - first model call's start), timestamps taken in the
            actor (model loading and Ray start-up excluded, printed separately; any wait of the
            actor for input is included).
Prints both rates and their ratio (goal: pipeline >= 0.95 x raw, issue 19).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import io
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_jpeg(rng, h=128, w=64) -> bytes:
    """A smooth random picture (so JPEG sizes look like real crops, not noise)."""
    from PIL import Image

    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(work: pathlib.Path, n: int, backbone: str, shard_size: int) -> list[bytes]:
    import torch

    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model
    from model.shards import write_shards

    rng = np.random.default_rng(0)
    images = [make_jpeg(rng) for _ in range(n)]
    samples = [({"image_id": f"bounding_box_test/{i // 8:04d}_c{i % 6 + 1}s1_{i:06d}.jpg",
                 "item_id": str(i // 8), "camera_id": i % 6 + 1, "split": "gallery", "path": f"g/{i}.jpg"},
                images[i], "jpg") for i in range(n)]
    write_shards(samples, str(work / "shards"), "gallery", shard_size=shard_size)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, input_size=(256, 128))
    save_model(build_model(cfg).eval(), cfg, str(work / "model"))
    return images


def raw_forward(model_dir: str, images: list[bytes], batch_size: int, threads: int, warmup: int = 1) -> float:
    """Images/s of forward (+ test-time flip when the model says so) + normalise on
    pre-decoded tensors, in this process."""
    import torch

    from model.checkpoint import load_model
    from model.embedding import forward_embeddings, prepare_model
    from model.transforms import decode_image, eval_transform

    torch.set_num_threads(threads)
    net, cfg, _ = load_model(model_dir)
    net = prepare_model(net, "cpu", tuple(cfg.input_size))  # frozen, as in the actors
    tf = eval_transform(cfg)
    x = torch.stack([tf(decode_image(b)) for b in images])
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    for b in batches[:warmup]:
        forward_embeddings(net, b, "cpu", flip=cfg.flip_test)  # as the actors do
    t = time.perf_counter()
    for b in batches:
        forward_embeddings(net, b, "cpu", flip=cfg.flip_test)  # as the actors do
    return len(x) / (time.perf_counter() - t)


def decode_seconds(model_dir: str, images: list[bytes]) -> float:
    """Seconds per image of what the actor does besides the forward pass: decode + resize +
    batched normalise (one thread)."""
    from model.checkpoint import load_model
    from model.transforms import BatchEvalTransform, decode_image

    _, cfg, _ = load_model(model_dir)
    tf = BatchEvalTransform(cfg)
    t = time.perf_counter()
    tf.normalize([tf.resize(decode_image(b)) for b in images])
    return (time.perf_counter() - t) / len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, raw and per actor")
    p.add_argument("--num-cpus", type=int, default=max(2, os.cpu_count() or 2), help="CPUs of the local Ray")
    p.add_argument("--shard-size", type=int, default=0,
                   help="images per shard (default: the batch size, so results stream back per batch)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        images = make_data(work, args.images, args.backbone, args.shard_size or args.batch_size)
        print(f"{args.images} JPEGs 64x128 -> {args.backbone} at 256x128, batch {args.batch_size}, "
              f"{args.threads} torch thread(s), machine CPUs {os.cpu_count()}", flush=True)
        raw = raw_forward(str(work / "model"), images, args.batch_size, args.threads)
        print(f"raw forward: {raw:.2f} img/s", flush=True)
        cmd = [sys.executable, str(REPO / "pipelines" / "embed.py"), "--model", str(work / "model"),
               "--shards", str(work / "shards"), "--out", str(work / "emb"), "--batch-size", str(args.batch_size),
               "--actors", "1", "--threads", str(args.threads), "--num-cpus", str(args.num_cpus)]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"embed.py failed: {r.stderr[-2000:]}")
        with open(work / "emb" / "_embed.json") as f:
            s = json.load(f)
        steady = s["steady_images_per_second"]
        print(f"pipeline: {s['embedded']} embedded; steady {steady:.2f} img/s (first model call to last, "
              f"actor busy {100 * s['model_busy_fraction']:.1f}% of it); streaming phase "
              f"{s['seconds']:.1f}s of which {s['first_batch_seconds']:.1f}s until the first batch "
              f"(actor start + model load); wall incl. Ray start {wall:.1f}s "
              f"({s['embedded'] / wall:.2f} img/s end to end)", flush=True)
        raw_after = raw_forward(str(work / "model"), images, args.batch_size, args.threads)
        raw_mean = (raw + raw_after) / 2
        print(f"raw forward again: {raw_after:.2f} img/s (the machine may be shared: the mean of the "
              f"runs before and after the pipeline is the reference, {raw_mean:.2f} img/s)", flush=True)
        dec = decode_seconds(str(work / "model"), images)
        fwd = 1 / raw_mean
        print(f"per image: forward {1000 * fwd:.1f} ms, decode+transform {1000 * dec:.2f} ms (one thread); "
              f"in series they would allow {fwd / (fwd + dec):.3f} of raw", flush=True)
        print(f"RESULT pipeline/raw = {steady / raw_mean:.3f} measured (goal >= 0.95; timings on a shared "
              f"machine are noisy), {fwd / (fwd + dec):.3f} implied by the decode cost")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
