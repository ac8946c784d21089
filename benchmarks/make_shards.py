"""Images per second of pipelines/make_shards.py (decode check + shard writing).

    python benchmarks/make_shards.py                       # market1501_mini, workers 1 and 2
    python benchmarks/make_shards.py --root DIR --format folders --workers 4

Runs the real CLI in a child process `--repeat` times per worker count and reports the best
wall time as images/s (process start and imports included), plus the child's CPU seconds
(user + system) per image: on a shared machine the CPU figure is the steadier one, but it is
complete only with --workers 1 (decode workers run under a forkserver, not as children). The load
average at the start is printed because other jobs on the same cores slow the wall figure.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MARKET_MINI = REPO.parent / "shared" / "data" / "market1501_mini" / "Market-1501-v15.09.15"


def run_once(args, workers: int, out: str) -> tuple[float, float, int]:
    """-> (wall seconds, child CPU seconds, images written)."""
    cmd = [sys.executable, str(REPO / "pipelines" / "make_shards.py"), "--format", args.format,
           "--root", args.root, "--out", out, "--workers", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        sys.exit(f"make_shards.py failed: {r.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    import pyarrow.parquet as pq

    n = pq.read_metadata(os.path.join(out, "manifest.parquet")).num_rows
    return wall, cpu, n


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(MARKET_MINI), help="dataset root (default market1501_mini)")
    p.add_argument("--format", default="market1501", choices=["market1501", "folders", "manifest"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None, help="append the figures to this JSON-lines file")
    args = p.parse_args()
    if not os.path.isdir(args.root):
        sys.exit(f"dataset not found: {args.root}")
    load = os.getloadavg()[0]
    for workers in args.workers:
        runs = []
        with tempfile.TemporaryDirectory() as work:
            for i in range(args.repeat):
                runs.append(run_once(args, workers, os.path.join(work, f"out{i}")))
        wall, cpu, n = min(runs)
        fig = {"dataset": os.path.basename(os.path.normpath(args.root)), "images": n,
               "workers": workers, "best_wall_s": round(wall, 2),
               "images_per_s": round(n / wall), "cpu_s_per_1000_images": round(1000 * cpu / n, 3),
               "load_avg_1min_at_start": round(load, 1),
               "machine": f"{platform.machine()} cores={os.cpu_count()}"}
        print(f"make_shards workers={workers}: {n} images, best of {args.repeat}: {wall:.2f} s "
              f"= {n / wall:.0f} images/s (CPU {1000 * cpu / n:.2f} s per 1000 images)")
        print(json.dumps(fig))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(fig) + "\n")


if __name__ == "__main__":
    main()
