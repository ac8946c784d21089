"""Training throughput: images/s of pipelines/train.py with 1 and with 2 Ray Train workers.

    python benchmarks/train_throughput.py --shards outputs/market_mini/shards
    python benchmarks/train_throughput.py --shards S --backbone resnet18 --workers 1 2 4
    python benchmarks/train_throughput.py --shards S --set train.channels_last=false   # a speed lever

For each worker count, runs the real job (TorchTrainer, DDP over gloo on CPU, P x M batches
decoded from the shards by each worker) for --epochs short epochs of --steps steps and prints
the images/s of the last epoch (all ranks together; the first epoch warms up threads and
allocators), plus the 1-core forward+backward rate of the bare network for scale. The global
batch grows with the workers (each takes its own P items), as in training.
Also prints the machine's load average: on a shared machine the figures move with it.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import tempfile
import time


def bare_rate(backbone: str, size: tuple[int, int], batch: int, threads: int, reps: int = 3) -> float:
    """images/s of forward + backward + Adam step of the bare network on random input."""
    import torch

    from model.checkpoint import build_model
    from model.config import ModelConfig

    torch.set_num_threads(threads)
    net = build_model(ModelConfig(backbone=backbone, num_classes=100, input_size=size)).train()
    opt = torch.optim.Adam(net.parameters())
    x = torch.randn(batch, 3, *size)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        feat, _, logits = net(x)
        (feat.mean() + logits.mean()).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return batch / min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="make_shards output or shards folder")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone (efficientnet_lite0)")
    p.add_argument("--input-size", nargs=2, type=int, default=[128, 64], help="H W (128 64)")
    p.add_argument("--P", type=int, default=8, help="items per worker per step (8)")
    p.add_argument("--M", type=int, default=4, help="images per item (4)")
    p.add_argument("--steps", type=int, default=6, help="steps per epoch (6)")
    p.add_argument("--epochs", type=int, default=2, help="epochs; the last one is timed (2)")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker counts (1 2)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied last, e.g. data.loader_threads=2 or "
                        "train.channels_last=false (repeatable)")
    args = p.parse_args()

    from model.config import load_config
    from pipelines.train import run_training

    size = tuple(args.input_size)
    print(f"load average before: {os.getloadavg()}" + (f"; overrides {args.set}" if args.set else ""))
    rate = bare_rate(args.backbone, size, args.P * args.M, threads=1)
    print(f"bare network, 1 thread, batch {args.P * args.M}: {rate:.1f} images/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            cfg = load_config(None, [
                f"data.shards={args.shards}", f"model.backbone={args.backbone}",
                f"model.input_size=[{size[0]}, {size[1]}]", f"data.P={args.P}", f"data.M={args.M}",
                f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps}",
                "train.eval_every=-1", f"run.num_workers={w}", "run.use_gpu=false",
                f"run.name=bench-{w}", f"run.storage_path={tmp}", f"run.output={tmp}/model-{w}",
                "data.loader_threads=1", *args.set])
            out = run_training(cfg, num_cpus=args.num_cpus or max(2, w))
            m = out["metrics"]
            rows.append({"workers": w, "images_per_s": m["images_per_s"],
                         "images": m["images"], "epoch_seconds": m["epoch_seconds"],
                         "load_average": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    print("\nworkers  images/s  (last epoch)")
    for r in rows:
        print(f"{r['workers']:>7}  {r['images_per_s']:>8.1f}")


if __name__ == "__main__":
    main()
