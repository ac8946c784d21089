"""Training images/s: a plain single-process PyTorch loop against pipelines/train.py (Ray Train).

    python benchmarks/peers/train_loop.py --shards outputs/market_mini/shards
    python benchmarks/peers/train_loop.py --shards S --out benchmarks/results/peers_train_loop.json

The same network (model.checkpoint.build_model: EfficientNet-Lite0, R-MAC, BN-neck, 128x64 by
default), the same batch (P x M = 16 x 4 images per step), the same augmentation
(model.transforms.train_transform) and the same losses (CE + batch-hard triplet + CTL +
center, model.training.compute_losses), on the same train shards:
- peer: what a user writes without this project: webdataset's WebDataset + a torch DataLoader
  (1 decode worker), batches of P*M images in shard order, Adam, one process with every core's
  threads;
- train.py with 1 Ray Train worker (all the cores) and with 2 workers (DDP over gloo, one core
  each; each worker takes its own P x M, so a step is twice the images).
Each runs in its own process; the figure is images/s over the steps after --warmup steps
(the Ray runs: their last epoch). Prints the machine's load average: on a shared machine the
figures move with it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def plain_loop(shards: str, backbone: str, size: tuple[int, int], batch: int, steps: int,
               warmup: int, threads: int) -> dict:
    """The peer, in this process: images/s over `steps` steps after `warmup` steps."""
    import torch
    import webdataset as wds

    from model.checkpoint import build_model
    from model.config import ModelConfig, TrainConfig
    from model.losses import CenterLoss
    from model.shards import list_shards
    from model.training import compute_losses
    from model.transforms import train_transform

    torch.set_num_threads(threads)
    urls = list_shards(shards, "train")
    items = sorted({json.loads(s["json"])["item_id"] for s in wds.WebDataset(urls, shardshuffle=False)})
    label = {item: i for i, item in enumerate(items)}
    cfg = ModelConfig(backbone=backbone, num_classes=len(items), input_size=size)
    tcfg = TrainConfig()
    tf = train_transform(cfg)
    ds = (wds.WebDataset(urls, shardshuffle=False).repeat()
          .decode("pil").to_tuple("jpg", "json")
          .map_tuple(lambda im: tf(im.convert("RGB")), lambda meta: label[meta["item_id"]]))
    loader = torch.utils.data.DataLoader(ds.batched(batch, partial=False), batch_size=None, num_workers=1)
    net = build_model(cfg).train().to(memory_format=torch.channels_last)
    center = CenterLoss(len(items), cfg.embedding_dim)
    opt = torch.optim.Adam(list(net.parameters()), lr=tcfg.lr)
    copt = torch.optim.SGD(center.parameters(), lr=tcfg.center_lr)
    t0 = None
    images = 0
    for step, (x, y) in enumerate(loader):
        if step == warmup:
            t0, images = time.perf_counter(), 0
        if step == warmup + steps:
            break
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(y)
        feat, _, logits = net(x)
        loss, _ = compute_losses(feat, logits, y, center, tcfg)
        opt.zero_grad(set_to_none=True)
        copt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        copt.step()
        images += len(y)
    seconds = time.perf_counter() - t0
    return {"images_per_s": round(images / seconds, 2), "images": images, "seconds": round(seconds, 2)}


def ray_run(shards: str, backbone: str, size: tuple[int, int], P: int, M: int, steps: int,
            workers: int, cpus: int, out: str) -> dict:
    """train.py's run_training (embedded Ray), 2 epochs of `steps` steps; the last epoch's rate."""
    from model.config import load_config
    from pipelines.train import run_training

    cfg = load_config(None, [
        f"data.shards={shards}", f"model.backbone={backbone}", f"model.input_size=[{size[0]}, {size[1]}]",
        f"data.P={P}", f"data.M={M}", "train.epochs=2", f"train.steps_per_epoch={steps}",
        "train.eval_every=-1", f"run.num_workers={workers}", "run.use_gpu=false",
        f"run.cpus_per_worker={cpus // workers}", f"data.loader_threads={max(1, cpus // workers)}",
        "run.name=bench", f"run.storage_path={out}", f"run.output={out}/model"])
    m = run_training(cfg, num_cpus=cpus)["metrics"]
    return {"images_per_s": m["images_per_s"], "images": m["images"], "seconds": m["epoch_seconds"]}


def child(args) -> dict:
    size = tuple(args.input_size)
    if args.child == "plain":
        return plain_loop(args.shards, args.backbone, size, args.P * args.M, args.steps, args.warmup,
                          args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        return ray_run(args.shards, args.backbone, size, args.P, args.M, args.steps,
                       int(args.child.split("-")[1]), args.cpus, tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="make_shards output or its shards folder")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--input-size", nargs=2, type=int, default=[128, 64], metavar=("H", "W"))
    p.add_argument("--P", type=int, default=16, help="items per step (per worker)")
    p.add_argument("--M", type=int, default=4, help="images per item")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="plain loop: untimed first steps (default 3)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="cores for each run")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    shards = pathlib.Path(a.shards)
    a.shards = str((shards / "shards") if (shards / "shards").is_dir() else shards)
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return 0
    runs = [("plain PyTorch loop (peer)", "plain"), ("train.py, 1 Ray Train worker", "ray-1")]
    if a.cpus >= 2:
        runs.append(("train.py, 2 Ray Train workers", "ray-2"))
    load0 = os.getloadavg()
    rows = []
    base = [sys.executable, __file__, "--shards", a.shards, "--backbone", a.backbone, "--input-size",
            *map(str, a.input_size), "--P", str(a.P), "--M", str(a.M), "--steps", str(a.steps),
            "--warmup", str(a.warmup), "--cpus", str(a.cpus)]
    for name, what in runs:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        r = subprocess.run([*base, "--child", what], capture_output=True, text=True, cwd=REPO, env=env,
                           check=False)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode or not lines:
            raise SystemExit(f"{name} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
        row = {"run": name, **json.loads(lines[-1]), "load_average_after": os.getloadavg()[0]}
        rows.append(row)
        print(f"{name:<32} {row['images_per_s']:>8.1f} images/s  ({row['images']} images, "
              f"{row['seconds']:.1f} s)", flush=True)
    peer = rows[0]["images_per_s"]
    for row in rows[1:]:
        row["vs_peer"] = round(row["images_per_s"] / peer, 3)
    print("\n| run | images/s | vs plain loop |\n|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['images_per_s']:.1f} | {row.get('vs_peer', 1.0):.2f} |")
    if a.out:
        result = {"runs": rows, "backbone": a.backbone, "input_size": a.input_size, "P": a.P, "M": a.M,
                  "steps": a.steps, "cpus": a.cpus,
                  "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_avg_at_start": load0},
                  "command": "python benchmarks/peers/train_loop.py " + " ".join(argv or sys.argv[1:])}
        out = pathlib.Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
