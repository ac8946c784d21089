"""The retrieval toolkit compared on one data set: pooling x loss x post-processing.

    python benchmarks/toolkit_table.py --shards outputs/market_mini_ctl --work outputs/toolkit \
        --out benchmarks/results/toolkit_market_mini.json

For every pooling (avg, gem, rmac) and loss (CTL = CE + triplet + center + CTL; CTL+AP = the
same plus the listwise AP loss, weight --ap-weight) it trains the same network with the same
budget (pipelines/train.py: EfficientNet-Lite0 from its local ImageNet weights, 128x64, 2
workers, --epochs epochs of 10 steps, seed 0), embeds query and gallery (pipelines/embed.py)
and scores them (pipelines/evaluate.py, instance and centroid mode) after each
post-processing: none, PCA-whitening (square-root, --white-dim, fitted on the gallery),
alpha-QE, DBA + AQE, diffusion, DBA + AQE + diffusion, k-reciprocal. Every step is the real
job run as a subprocess; a model, embedding or report already in --work is reused, so an
interrupted run picks up where it stopped. Prints the table and writes it (JSON) to --out.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import subprocess
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
POST = ["none", "pcaw", "alpha-qe", "dba,aqe", "diffusion", "dba,aqe,diffusion", "kreciprocal"]


def run(args: list, log: pathlib.Path) -> None:
    cmd = [sys.executable, *map(str, args)]
    print("$ python " + " ".join(str(a).replace(str(REPO) + "/", "") for a in args), flush=True)
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}); see {log}")


def train_args(a, pooling: str, loss: str, name: str, out: pathlib.Path) -> list:
    e = a.epochs
    args = [REPO / "pipelines" / "train.py", "--shards", a.shards, "--backbone", "efficientnet_lite0",
            "--pretrained", "lite0-imagenet", "--input-size", 128, 64, "--P", 8, "--M", 4,
            "--epochs", e, "--warmup-epochs", max(1, e // 10), "--milestones", int(e * 0.7), int(e * 0.9),
            "--num-workers", 2, "--seed", 0, "--loader-threads", 1, "--pooling", pooling,
            "--eval-every", -1, "--name", name, "--storage-path", a.work / "ray_results", "--output", out]
    if loss == "ctl+ap":
        args += ["--ap-weight", a.ap_weight]
    return args


def evaluate(a, emb: pathlib.Path, work: pathlib.Path, log: pathlib.Path) -> list[dict]:
    """Reports of every post-processing in both modes (list of evaluate.py report dicts)."""
    out = work / "eval.json"
    if not out.exists():
        reranks = [x for p in POST if p != "pcaw" for x in ("--rerank", p)]
        run([REPO / "pipelines" / "evaluate.py", "--query", emb, "--query-split", "query", "--gallery", emb,
             "--gallery-split", "gallery", "--mode", "both", *reranks, "--out", out], log)
    reports = json.loads(out.read_text())
    white = work / f"eval_pcaw{a.white_dim}.json"
    if not white.exists():
        npz, wemb = work / f"pcaw{a.white_dim}.npz", work / f"emb_pcaw{a.white_dim}"
        run([REPO / "pipelines" / "whiten.py", "--embeddings", emb, "--dim", a.white_dim, "--power", 0.5,
             "--out", npz], log)
        run([REPO / "pipelines" / "whiten.py", "--apply", npz, "--embeddings", emb, "--out", wemb], log)
        run([REPO / "pipelines" / "evaluate.py", "--query", wemb, "--query-split", "query", "--gallery", wemb,
             "--gallery-split", "gallery", "--mode", "both", "--out", white], log)
    for r in json.loads(white.read_text()):
        r["rerank"] = "pcaw"
        reports.append(r)
    return reports


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="make_shards output of market1501_mini")
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path("outputs/toolkit"))
    p.add_argument("--out", default="benchmarks/results/toolkit_market_mini.json")
    p.add_argument("--epochs", type=int, default=30, help="training budget per model (10 steps each)")
    p.add_argument("--ap-weight", type=float, default=1.0)
    p.add_argument("--white-dim", type=int, default=256)
    p.add_argument("--pooling", nargs="+", default=["avg", "gem", "rmac"])
    p.add_argument("--loss", nargs="+", default=["ctl", "ctl+ap"], choices=["ctl", "ctl+ap"])
    p.add_argument("--print-only", action="store_true", help="print the table of an existing --out and stop")
    a = p.parse_args()
    if a.print_only:
        print_table(json.loads(pathlib.Path(a.out).read_text())["rows"])
        return
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    for pooling in a.pooling:
        for loss in a.loss:
            name = f"{pooling}-{loss.replace('+', '-')}-e{a.epochs}"
            work = a.work / name
            work.mkdir(exist_ok=True)
            log = work / "log.txt"
            model, emb = work / "model", work / "emb"
            t = time.perf_counter()
            if not (model / "model.pt").exists():
                run(train_args(a, pooling, loss, name, model), log)
            train_s = time.perf_counter() - t
            if not emb.exists():
                run([REPO / "pipelines" / "embed.py", "--model", model, "--shards", a.shards, "--out", emb], log)
            runs.append({"pooling": pooling, "loss": loss, "train_s": round(train_s, 1),
                         "command": "python " + " ".join(str(x).replace(str(REPO) + "/", "")
                                                         for x in train_args(a, pooling, loss, name, model))})
            for r in evaluate(a, emb, work, log):
                rows.append({"pooling": pooling, "loss": loss, "post": r["rerank"] or "none",
                             "mode": r["mode"], "mAP": round(r["mAP"], 4), "R1": round(r["cmc"]["1"], 4),
                             "mINP": round(r["mINP"], 4)})
            print(f"{name}: done", flush=True)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"data": "market1501_mini", "epochs": a.epochs, "runs": runs, "rows": rows},
                              indent=1) + "\n")
    os.replace(tmp, out)
    print_table(rows)
    print(f"\nresults: {out}")


def print_table(rows: list[dict]) -> None:
    """Markdown: one line per model x post-processing, instance and centroid side by side."""
    key = {(r["pooling"], r["loss"], r["post"], r["mode"]): r for r in rows}
    models = list(dict.fromkeys((r["pooling"], r["loss"]) for r in rows))
    print("\n| pooling | loss | post-processing | inst. mAP | inst. R1 | centroid mAP | centroid R1 |")
    print("|---|---|---|---|---|---|---|")
    for pooling, loss in models:
        for post in POST:
            i, c = key.get((pooling, loss, post, "instance")), key.get((pooling, loss, post, "centroid"))
            if i and c:
                print(f"| {pooling} | {loss} | {post} | {i['mAP']:.3f} | {i['R1']:.3f} | "
                      f"{c['mAP']:.3f} | {c['R1']:.3f} |")


if __name__ == "__main__":
    main()
