"""The whole pipeline at gallery scale on this machine: wall time, images/s, peak memory per stage.

    python benchmarks/scale.py --work /tmp/scale --out benchmarks/results/scale.json

300,000 synthetic images (10,000 identities x 30, 64x32) -> shards -> embed (EfficientNet-Lite0
from its local ImageNet weights, 64x32 input, no training) -> centroids -> sharded index of
every gallery image -> 10,000 queries with k-reciprocal re-ranking -> evaluation of the
retrieved lists (mAP@k). Each stage is the real job run as a subprocess (the commands are
recorded in the JSON); peak memory is the largest summed RSS of the job's whole process tree
(Ray workers included), sampled every 0.5 s. Use --items/--images-per-item to run smaller.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import platform
import subprocess
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def process_tree_rss(root: int) -> int:
    """Summed RSS in bytes of `root` and all its descendants (from /proc)."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        parent[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * PAGE
    total, todo = 0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def save(log: dict, out: pathlib.Path) -> None:
    """Write the results so far (temp name, then rename): an interrupted run keeps its figures."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(log, indent=2) + "\n")
    os.replace(tmp, out)


def run_stage(name: str, args: list, log: dict, images: int | None = None) -> dict:
    done = {s["stage"]: s for s in log.get("resumed_from", [])}
    if name in done:  # --resume: this stage finished in an earlier, interrupted run
        log["stages"].append(done[name])
        print(f"\n== {name}: kept from the earlier run ({done[name]['wall_s']} s)", flush=True)
        return done[name]
    cmd = [sys.executable, *map(str, args)]
    print(f"\n== {name}\n$ {' '.join(map(str, args))}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], process_tree_rss(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    proc.wait()
    sampler.join()
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.strip() and " INFO " not in ln]
    print("\n".join("   " + ln[:200] for ln in lines[-5:]), flush=True)
    if proc.returncode:
        raise SystemExit(f"stage {name} failed with exit {proc.returncode}")
    fig = {"stage": name, "wall_s": round(wall, 1), "peak_rss_gb": round(peak[0] / 2**30, 2),
           "command": "python " + " ".join(str(a).replace(str(REPO) + "/", "") for a in args)}
    if images:
        fig["images"] = images
        fig["images_per_s"] = round(images / wall, 1)
    log["stages"].append(fig)
    if "_out" in log:
        save({k: v for k, v in log.items() if k not in ("resumed_from", "_out")}, log["_out"])
    print(f"   -> {fig['wall_s']} s, peak {fig['peak_rss_gb']} GB"
          + (f", {fig['images_per_s']} images/s" if images else ""), flush=True)
    return fig


def make_model(path: pathlib.Path, size: tuple[int, int]) -> None:
    """Lite0 with its ImageNet weights from the local package, saved as a model directory."""
    from model.checkpoint import build_model, load_pretrained, save_model
    from model.config import ModelConfig

    cfg = ModelConfig(backbone="efficientnet_lite0", input_size=size)
    net = build_model(cfg)
    load_pretrained(net, "lite0-imagenet")
    save_model(net, cfg, str(path))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="outputs/scale")
    p.add_argument("--out", default="benchmarks/results/scale.json")
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--images-per-item", type=int, default=30)
    p.add_argument("--index-shards", type=int, default=4)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--rerank", default="kreciprocal")
    p.add_argument("--resume", action="store_true",
                   help="keep the stages an interrupted run with the same --work/--out finished "
                        "(their outputs are reused) and run the rest")
    args = p.parse_args()
    work = pathlib.Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pipe = REPO / "pipelines"
    log = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                      f"{os.sysconf('SC_PHYS_PAGES') * PAGE / 2**30:.0f} GiB, no GPU",
           "items": args.items, "images_per_item": args.images_per_item, "stages": []}
    out = pathlib.Path(args.out)
    if args.resume and out.exists():
        earlier = json.loads(out.read_text())
        if earlier.get("complete") is False and earlier.get("items") == args.items:
            log["resumed_from"] = earlier["stages"]
            log["resumed_stages"] = [st["stage"] for st in earlier["stages"]]
            if earlier.get("note"):
                log["note"] = earlier["note"]
    log["complete"] = False
    log["_out"] = out
    n_images = args.items * args.images_per_item
    data, shards, model = work / "data", work / "shards", work / "model"
    emb, qemb, cents, idx, results = (work / "emb", work / "qemb", work / "centroids", work / "indexes",
                                      work / "results")

    run_stage("synthetic images", [pipe / "make_synthetic.py", "--items", args.items, "--images-per-item",
              args.images_per_item, "--cameras", 6, "--size", "64x32", "--train-fraction", 0,
              "--out", data], log, images=n_images)
    run_stage("make_shards", [pipe / "make_shards.py", "--format", "market1501", "--root", data,
              "--out", shards, "--shard-size", 2000], log, images=n_images)
    if not (model / "model.pt").exists():
        make_model(model, (64, 32))
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest = pq.read_table(shards / "manifest.parquet", columns=["split"])
    gallery = int(pc.sum(pc.equal(manifest.column("split"), "gallery")).as_py())
    queries = int(pc.sum(pc.equal(manifest.column("split"), "query")).as_py())
    log.update(gallery_images=gallery, queries=queries)
    run_stage("embed gallery", [pipe / "embed.py", "--model", model, "--shards", shards / "shards",
              "--split", "gallery", "--out", emb], log, images=gallery)
    run_stage("embed queries", [pipe / "embed.py", "--model", model, "--shards", shards / "shards",
              "--split", "query", "--out", qemb], log, images=queries)
    run_stage("centroids", [pipe / "centroids.py", "--embeddings", emb, "--out", cents], log, images=gallery)
    run_stage("build_index (images)", [pipe / "build_index.py", "--vectors", emb, "--root", idx,
              "--name", "scale", "--shards", args.index_shards], log, images=gallery)
    run_stage(f"query + {args.rerank}", [pipe / "query.py", "--index", idx / "scale", "--queries", qemb,
              "--k", args.k, "--rerank", args.rerank, "--out", results], log, images=queries)
    run_stage("evaluate (mAP@k)", [pipe / "evaluate.py", "--results", results, "--query", qemb,
              "--gallery-labels", emb, "--out", work / "report.json"], log)
    log["report"] = json.loads((work / "report.json").read_text())
    log["complete"] = True
    log.pop("resumed_from", None)
    log.pop("_out", None)
    save(log, out)
    print("\n| stage | wall s | images/s | peak RSS GB |\n|---|---|---|---|")
    for s in log["stages"]:
        print(f"| {s['stage']} | {s['wall_s']} | {s.get('images_per_s', '')} | {s['peak_rss_gb']} |")
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
