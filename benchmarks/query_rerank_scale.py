"""query.py with k-reciprocal re-ranking at scale: wall time, peak memory, and where the time goes.

    python benchmarks/query_rerank_scale.py --queries 10000 --gallery 300000 --dim 1280
    python benchmarks/query_rerank_scale.py --queries 2000 --gallery 60000 --without-graph --profile /tmp/q

Synthetic ReID-like vectors (benchmarks/rerank.py's generator: look-alike groups close and
noise high enough that plain mAP is well below 1, 30 images per item) are written as embeddings Parquet, an index of --shards shards is built with
build_index.py (--index-type, default auto; --rerank-graph --graph-k: the stored gallery graph;
with --without-graph also one without it), then the real job
`query.py --k 100 --rerank kreciprocal` runs in its own process: its wall time and peak RSS
(its own, benchmarks/measure.py) are the figures, and evaluate.py scores its lists (mAP@k, Rank-1) beside the plain
search's. With --profile FILE, each re-ranked query runs under py-spy (to FILE.g / FILE.gg) (`py-spy record --format
raw`: collapsed stacks, which flamegraph tools draw) and the share of samples under each of the
project's functions (inclusive) is printed.
Data and index are kept in --work and reused when they exist.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import shutil
import subprocess
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import run_measured  # noqa: I001
PACKAGES = {"pipelines", "index", "model", "contracts", "serving", "cluster"}


def write_data(work: pathlib.Path, queries: int, gallery: int, dim: int) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from rerank import clustered_vectors

    from contracts.vectors import make_embeddings_table, write_table_atomic

    if (work / "gallery.parquet").exists() and (work / "query.parquet").exists():
        return
    q, g, qi, gi = clustered_vectors(queries, gallery, dim, per_item=30, seed=0, spread=0.6, noise=1.5)
    rng = np.random.default_rng(1)
    for name, x, items, cams in (("query", q, qi, rng.integers(1, 7, len(qi))),
                                 ("gallery", g, gi, np.arange(len(gi)) % 6 + 1)):
        n = len(x)
        t = make_embeddings_table([f"{name}/{i:07d}.jpg" for i in range(n)], [str(i) for i in items],
                                  cams, [name] * n, x, "scale")
        write_table_atomic(t, str(work / f"{name}.parquet"))


def run(cmd: list, log: pathlib.Path) -> tuple[float, float]:
    """(wall s, peak RSS GB) of one child process (its own peak: benchmarks/measure.py); its
    output goes to `log`."""
    with open(log, "w") as f:
        code, wall, peak = run_measured(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"{cmd[1]} failed: {' | '.join(tail)}")
    return round(wall, 1), round(peak / 1e9, 2)


def score(work: pathlib.Path, results: pathlib.Path, log: pathlib.Path) -> dict:
    report = results.with_suffix(".json")
    run([sys.executable, REPO / "pipelines" / "evaluate.py", "--results", results, "--query",
         work / "query.parquet", "--gallery-labels", work / "gallery.parquet", "--quiet", "--out", report], log)
    r = json.loads(report.read_text())
    r = r[0] if isinstance(r, list) else r
    return {"mAP@k": round(r["mAP"], 4), "rank1": round(r["cmc"]["1"], 4)}


def top_agreement(a: pathlib.Path, b: pathlib.Path, k: int) -> float:
    """Share of (query, rank < k) positions where two result folders name the same image."""
    import pyarrow.dataset as pads

    def table(p):
        t = pads.dataset(str(p), format="parquet").to_table(columns=["query_id", "rank", "image_id"])
        t = t.filter(pads.field("rank") < k).sort_by([("query_id", "ascending"), ("rank", "ascending")])
        return t.column("query_id").to_pylist(), t.column("image_id").to_pylist()

    (qa, ia), (qb, ib) = table(a), table(b)
    if qa != qb:
        return 0.0
    return round(sum(x == y for x, y in zip(ia, ib)) / max(1, len(ia)), 4)


def profile_shares(raw: pathlib.Path) -> dict[str, float]:
    """Collapsed stacks ("frame;frame;... count") -> {project function: inclusive share},
    largest first. A frame is "function (path:line)"; only frames in this repository count."""
    total, inclusive = 0, {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            path = where.rsplit(":", 1)[0]
            rel = path.replace(str(REPO) + "/", "")  # py-spy writes paths relative to the cwd
            if rel.split("/", 1)[0] in PACKAGES:
                key = f"{name} ({path.replace(str(REPO) + '/', '')})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] = inclusive.get(key, 0) + n
    return dict(sorted(((k, v / max(total, 1)) for k, v in inclusive.items()), key=lambda kv: -kv[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--gallery", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=1280, help="vector dimension (Lite0 + R-MAC: 1280)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--index-type", default="auto")
    p.add_argument("--work", default="outputs/query_rerank_scale")
    p.add_argument("--profile", default=None, metavar="FILE", help="run the query under py-spy; stacks to FILE")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--graph-k", type=int, default=32, help="build_index --rerank-graph K (default 32)")
    p.add_argument("--without-graph", action="store_true",
                   help="also build an index without the stored graph and re-rank with it (the gallery "
                        "searched on every call, as before the graph): time, memory, agreement")
    a = p.parse_args()
    work = pathlib.Path(a.work).resolve() / f"{a.queries}x{a.gallery}x{a.dim}-hard"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_data(work, a.queries, a.gallery, a.dim)
    print(f"data: {a.queries} x {a.gallery} x {a.dim} in {time.perf_counter() - t0:.0f}s", flush=True)
    idx = work / "idx"
    builds = {}
    for name, extra in (("g", []), ("gg", ["--rerank-graph", str(a.graph_k)])):
        if name == "g" and not a.without_graph:
            continue
        if not (idx / name / "CURRENT").exists():
            shutil.rmtree(idx / name, ignore_errors=True)
            wall, rss = run([sys.executable, REPO / "pipelines" / "build_index.py", "--vectors",
                             work / "gallery.parquet", "--root", idx, "--name", name, "--shards", a.shards,
                             "--index-type", a.index_type, "--version", "v1", *extra], work / f"build_{name}.log")
            (work / f"build_{name}.json").write_text(json.dumps({"wall_s": wall, "peak_rss_gb": rss}))
            print(f"build_index{' ' + ' '.join(extra) if extra else ''}: {wall} s, {rss} GB", flush=True)
        if (work / f"build_{name}.json").exists():  # figures of the build that made the kept index
            builds[name] = json.loads((work / f"build_{name}.json").read_text())
    base = [sys.executable, REPO / "pipelines" / "query.py", "--queries", work / "query.parquet", "--k", "100",
            "--quiet"]
    shutil.rmtree(work / "plain", ignore_errors=True)
    plain_s, plain_gb = run([*base, "--index", idx / "gg", "--out", work / "plain"], work / "plain.log")
    plain = score(work, work / "plain", work / "eval_plain.log")
    print(f"query (no re-ranking): {plain_s} s, {plain_gb} GB, {plain}", flush=True)
    figures = {}
    for label, name in (("kreciprocal (gallery searched)", "g"), ("kreciprocal (stored graph)", "gg")):
        if name == "g" and not a.without_graph:
            continue
        shutil.rmtree(work / f"kr_{name}", ignore_errors=True)
        cmd = [*base, "--index", idx / name, "--rerank", "kreciprocal", "--out", work / f"kr_{name}"]
        prof = pathlib.Path(f"{a.profile}.{name}") if a.profile else None
        if prof:
            spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))
            cmd = [spy, "record", "--rate", "20", "--format", "raw", "-o", prof, "--", *cmd]
        kr_s, kr_gb = run(cmd, work / f"kr_{name}.log")
        kr = score(work, work / f"kr_{name}", work / f"eval_kr_{name}.log")
        print(f"query --rerank {label}: {kr_s} s, {kr_gb} GB, {kr}" + (" (under py-spy)" if prof else ""),
              flush=True)
        shares = profile_shares(prof) if prof else {}
        for fn, share in list(shares.items())[:20]:
            print(f"   {share:6.1%}  {fn}")
        figures[label] = {"wall_s": kr_s, "peak_rss_gb": kr_gb, **kr,
                          "profile_inclusive_shares": {k: round(v, 4) for k, v in list(shares.items())[:30]}}
    if len(figures) == 2:
        same = top_agreement(work / "kr_g", work / "kr_gg", 10)
        print(f"stored graph vs gallery searched: top-10 ids agree {same:.4f}", flush=True)
        figures["top10_agreement"] = same
    result = {"queries": a.queries, "gallery": a.gallery, "dim": a.dim, "shards": a.shards,
              "index_type": a.index_type, "graph_k": a.graph_k, "builds": builds,
              "plain": {"wall_s": plain_s, "peak_rss_gb": plain_gb, **plain}, **figures,
              "load_avg": os.getloadavg(), "profiled": bool(a.profile),
              "command": "python benchmarks/query_rerank_scale.py " + " ".join(sys.argv[1:])}
    print(json.dumps(result))
    if a.out:
        out = pathlib.Path(a.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
