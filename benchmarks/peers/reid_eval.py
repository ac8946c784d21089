"""mAP/CMC and k-reciprocal re-ranking: torchreid against this project, same data, one run.

    python benchmarks/peers/reid_eval.py --embeddings outputs/recipe/default-b1800-s0/emb
    python benchmarks/peers/reid_eval.py --synthetic 3368x19732 --dim 512
    python benchmarks/peers/reid_eval.py --embeddings EMB --synthetic 3368x19732 --out benchmarks/results/peers_reid_eval.json

Each measurement is its own process, timed from its start to its exit (Python start, imports,
reading the vectors and the work itself: the same footing for both), with its own peak RSS
(benchmarks/measure.py: the child's own, not the launching process's):
- torchreid `eval_market1501` (its Python form; source from torchreid's PyPI sdist at run time,
  benchmarks/peers/torchreid_source.py) on the squared-Euclidean distance matrix of the
  L2-normalised vectors, which is what torchreid computes for them;
- torchreid `re_ranking` (k1=20, k2=6, lambda=0.3) on the three Euclidean distance matrices
  (it squares them itself: the original distance of the paper and of DESIGN.md), then
  `eval_market1501`;
- `pipelines/evaluate.py --rerank none`, and `--rerank kreciprocal` with `--rerank-form dense`
  (the exact form) and `sparse` (the scalable one), same k1, k2, lambda.
The data: Market-1501-mini embeddings (`--embeddings`, an embed.py output with query and
gallery splits) and/or a synthetic ReID-like set (`--synthetic QxG`, clustered vectors with
look-alike groups; every gallery item in 6 cameras). Prints a table; writes JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
from measure import run_measured

K1, K2, LAMBDA = 20, 6, 0.3


# ---------------------------------------------------------------------------- the data

def synthetic(num_query: int, num_gallery: int, dim: int, seed: int = 0) -> dict:
    """Clustered vectors (benchmarks/rerank.py's generator, look-alikes close and noise high
    enough that plain mAP is ~0.6, not ~1: agreement is then a real check), cameras 1..6 per
    gallery item and a random camera per query: every query keeps 5 cross-camera matches."""
    from rerank import clustered_vectors

    q, g, qi, gi = clustered_vectors(num_query, num_gallery, dim, per_item=6, seed=seed,
                                     spread=0.6, noise=1.5)
    rng = np.random.default_rng(seed + 1)
    return {"q": q, "g": g, "q_pids": qi.astype(np.int64), "g_pids": gi.astype(np.int64),
            "q_cams": rng.integers(1, 7, len(qi)).astype(np.int64),
            "g_cams": (np.arange(len(gi)) % 6 + 1).astype(np.int64)}


def from_embeddings(path: str) -> dict:
    """Query and gallery rows of an embed.py output; item ids coded to integers."""
    from contracts.vectors import read_vectors

    q = read_vectors(path, kind="embeddings", split="query")
    g = read_vectors(path, kind="embeddings", split="gallery")
    # Market-1501's junk images (item "-1") are left out of the gallery, as torchreid's dataset
    # loader does and as evaluate.py does itself
    keep = np.asarray(g.item_ids) != "-1"
    g_items, g_vectors, g_cams = np.asarray(g.item_ids)[keep], g.vectors[keep], g.camera_ids[keep]
    codes = {item: i for i, item in enumerate(sorted(set(q.item_ids) | set(g_items)))}
    return {"q": q.vectors, "g": g_vectors,
            "q_pids": np.array([codes[i] for i in q.item_ids], np.int64),
            "g_pids": np.array([codes[i] for i in g_items], np.int64),
            "q_cams": q.camera_ids.astype(np.int64), "g_cams": g_cams.astype(np.int64)}


def write_inputs(d: dict, folder: pathlib.Path) -> None:
    """vectors.npz for the peer, query.parquet / gallery.parquet (embeddings contract) for us."""
    from contracts.vectors import make_embeddings_table, write_table_atomic

    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "vectors.npz", **d)
    for side, split in (("q", "query"), ("g", "gallery")):
        n = len(d[side])
        table = make_embeddings_table([f"{split}/{i:07d}.jpg" for i in range(n)],
                                      [str(p) for p in d[side + "_pids"]], d[side + "_cams"],
                                      [split] * n, d[side], "peers")
        write_table_atomic(table, str(folder / f"{split}.parquet"))


# ---------------------------------------------------------------------------- the children

def child_torchreid(what: str, folder: pathlib.Path, cache: pathlib.Path) -> dict:
    """Runs inside its own process: torchreid's functions on vectors.npz."""
    import warnings

    from peers.torchreid_source import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation is unavailable": known, intended
        rank, rerank = load(cache)
    d = np.load(folder / "vectors.npz")
    q, g = d["q"].astype(np.float32), d["g"].astype(np.float32)

    def sqdist(a, b):  # torchreid's euclidean distance matrix: |a|^2 + |b|^2 - 2ab
        return (np.square(a).sum(1)[:, None] + np.square(b).sum(1)[None, :] - 2.0 * a @ b.T)

    dist = sqdist(q, g)
    if what == "torchreid-rerank":  # re_ranking squares its inputs: give it Euclidean distances
        def euc(a, b):
            return np.sqrt(np.maximum(sqdist(a, b), 0))

        dist = rerank.re_ranking(euc(q, g), euc(q, q), euc(g, g), k1=K1, k2=K2, lambda_value=LAMBDA)
    cmc, mAP = rank.eval_market1501(dist, d["q_pids"], d["g_pids"], d["q_cams"], d["g_cams"], 50)
    return {"mAP": float(mAP), "rank1": float(cmc[0])}


def ours_command(what: str, folder: pathlib.Path, report: pathlib.Path) -> list[str]:
    cmd = [sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--query", str(folder / "query.parquet"),
           "--gallery", str(folder / "gallery.parquet"), "--mode", "instance", "--quiet",
           "--out", str(report)]
    if what == "ours":
        return [*cmd, "--rerank", "none"]
    form = what.rsplit("-", 1)[1]
    return [*cmd, "--rerank", "kreciprocal", "--rerank-form", form, "--k1", str(K1), "--k2", str(K2),
            "--lambda-value", str(LAMBDA)]


def run_one(what: str, folder: pathlib.Path, cache: pathlib.Path) -> dict:
    """One measurement in a fresh process, with its own peak RSS (benchmarks/measure.py)."""
    report = folder / f"{what}.json"
    if what.startswith("torchreid"):
        cmd = [sys.executable, __file__, "--child", what, "--folder", str(folder), "--cache", str(cache)]
    else:
        cmd = ours_command(what, folder, report)
    log_out, log_err = folder / f"{what}.out", folder / f"{what}.err"
    with open(log_out, "w") as fo, open(log_err, "w") as fe:  # files: a full pipe would block
        code, wall, rss = run_measured(cmd, stdout=fo, stderr=fe, cwd=REPO)
    out, err = log_out.read_text(), log_err.read_text()
    if code:
        raise SystemExit(f"{what} failed (exit {code}): {err.strip()[-400:]}")
    if what.startswith("torchreid"):
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise SystemExit(f"{what} failed: {err.strip()[-400:]}")
        r = json.loads(lines[-1])
    else:
        if not report.exists():
            raise SystemExit(f"{what} failed: {err.strip()[-400:]}")
        rep = json.loads(report.read_text())
        rep = rep[0] if isinstance(rep, list) else rep
        r = {"mAP": float(rep["mAP"]), "rank1": float(rep["cmc"]["1"])}
    return {"what": what, "wall_s": round(wall, 2), "peak_rss_gb": round(rss / 1e9, 3), **r}


RUNS = ("torchreid", "ours", "torchreid-rerank", "ours-rerank-dense", "ours-rerank-sparse")
SAME = {"ours": "torchreid", "ours-rerank-dense": "torchreid-rerank", "ours-rerank-sparse": "torchreid-rerank"}


def run_set(name: str, data: dict, work: pathlib.Path, cache: pathlib.Path, runs) -> dict:
    folder = work / name
    write_inputs(data, folder)
    q, g = len(data["q"]), len(data["g"])
    print(f"\n== {name}: {q} queries x {g} gallery, dim {data['q'].shape[1]}", flush=True)
    rows = []
    for what in runs:
        r = run_one(what, folder, cache)
        rows.append(r)
        print(f"   {what:<20} {r['wall_s']:>8.1f} s {r['peak_rss_gb']:>7.2f} GB  mAP {r['mAP']:.6f}  "
              f"R1 {r['rank1']:.4f}", flush=True)
    by = {r["what"]: r for r in rows}
    for r in rows:
        ref = by.get(SAME.get(r["what"], ""))
        if ref:
            r["mAP_minus_peer"] = r["mAP"] - ref["mAP"]
            r["speedup_vs_peer"] = round(ref["wall_s"] / r["wall_s"], 2)
            r["memory_vs_peer"] = round(r["peak_rss_gb"] / ref["peak_rss_gb"], 3)
    return {"name": name, "queries": q, "gallery": g, "dim": int(data["q"].shape[1]), "runs": rows}


def table(sets: list[dict]) -> str:
    lines = ["| data | what | wall s | peak RSS GB | mAP | Rank-1 | mAP − peer | × faster |",
             "|---|---|---|---|---|---|---|---|"]
    for s in sets:
        for r in s["runs"]:
            d = f"{r['mAP_minus_peer']:+.1e}" if "mAP_minus_peer" in r else ""
            x = f"{r['speedup_vs_peer']:.1f}" if "speedup_vs_peer" in r else ""
            lines.append(f"| {s['name']} {s['queries']}×{s['gallery']} | {r['what']} | {r['wall_s']:.1f} | "
                         f"{r['peak_rss_gb']:.2f} | {r['mAP']:.4f} | {r['rank1']:.4f} | {d} | {x} |")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    try:
        q, g = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--synthetic {text!r}: give QUERIESxGALLERY, e.g. 3368x19732") from None
    if q < 1 or g < 6:
        raise SystemExit("--synthetic: at least 1 query and 6 gallery vectors")
    return q, g


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", default=None, help="an embed.py output with query and gallery splits")
    p.add_argument("--synthetic", default=None, metavar="QxG", help="a synthetic set of this size")
    p.add_argument("--dim", type=int, default=512, help="synthetic vector dimension (default 512)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--cache", default=str(REPO / "outputs" / "peers-cache"),
                   help="where torchreid's sdist is downloaded and unpacked")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cache = pathlib.Path(a.cache).resolve()
    if a.child:
        print(json.dumps(child_torchreid(a.child, pathlib.Path(a.folder), cache)))
        return 0
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        raise SystemExit(f"--runs: unknown {bad[0] if bad else '(none)'!r}; choose from {', '.join(RUNS)}")
    if not a.embeddings and not a.synthetic:
        raise SystemExit("give --embeddings EMB and/or --synthetic QxG")
    from peers.torchreid_source import fetch

    fetch(cache)  # download once, before any timing
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = pathlib.Path(tmp)
        sets = []
        if a.embeddings:
            if not pathlib.Path(a.embeddings).exists():
                raise SystemExit(f"--embeddings {a.embeddings}: not found")
            sets.append(run_set("market-mini", from_embeddings(a.embeddings), work, cache, runs))
        if a.synthetic:
            q, g = parse_size(a.synthetic)
            sets.append(run_set("synthetic", synthetic(q, g, a.dim), work, cache, runs))
    print("\n" + table(sets))
    if a.out:
        result = {"sets": sets, "torchreid": "0.2.5 (PyPI sdist, Python eval_market1501, re_ranking)",
                  "k1": K1, "k2": K2, "lambda": LAMBDA, "started": started,
                  "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_avg_at_start": load0},
                  "command": "python benchmarks/peers/reid_eval.py " + " ".join(argv or sys.argv[1:])}
        out = pathlib.Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
