"""query.py with k-reciprocal re-ranking at scale: wall time, peak memory, and where the time goes.

    python benchmarks/query_rerank_scale.py --queries 10000 --gallery 300000 --dim 1280
    python benchmarks/query_rerank_scale.py --queries 2000 --gallery 60000 --profile /tmp/q.svg

Synthetic ReID-like vectors (benchmarks/rerank.py's generator: look-alike groups close and
noise high enough that plain mAP is well below 1, 30 images per item) are written as embeddings Parquet, an index of --shards shards is built with
build_index.py (--index-type, default auto), then the real job
`query.py --k 100 --rerank kreciprocal` runs in its own process: its wall time and peak RSS
(wait4) are the figures, and evaluate.py scores its lists (mAP@k, Rank-1) beside the plain
search's. With --profile FILE, the re-ranked query runs under py-spy (`py-spy record --format
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
    """(wall s, peak RSS GB) of one child process; its output goes to `log`."""
    with open(log, "w") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"{cmd[1]} failed: {' | '.join(tail)}")
    return round(wall, 1), round(usage.ru_maxrss * 1024 / 1e9, 2)


def score(work: pathlib.Path, results: pathlib.Path, log: pathlib.Path) -> dict:
    report = results.with_suffix(".json")
    run([sys.executable, REPO / "pipelines" / "evaluate.py", "--results", results, "--query",
         work / "query.parquet", "--gallery-labels", work / "gallery.parquet", "--quiet", "--out", report], log)
    r = json.loads(report.read_text())
    r = r[0] if isinstance(r, list) else r
    return {"mAP@k": round(r["mAP"], 4), "rank1": round(r["cmc"]["1"], 4)}


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
    a = p.parse_args()
    work = pathlib.Path(a.work).resolve() / f"{a.queries}x{a.gallery}x{a.dim}-hard"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_data(work, a.queries, a.gallery, a.dim)
    print(f"data: {a.queries} x {a.gallery} x {a.dim} in {time.perf_counter() - t0:.0f}s", flush=True)
    idx = work / "idx"
    if not (idx / "g" / "CURRENT").exists():
        shutil.rmtree(idx, ignore_errors=True)
        wall, rss = run([sys.executable, REPO / "pipelines" / "build_index.py", "--vectors",
                         work / "gallery.parquet", "--root", idx, "--name", "g", "--shards", a.shards,
                         "--index-type", a.index_type, "--version", "v1"], work / "build.log")
        print(f"build_index: {wall} s, {rss} GB", flush=True)
    base = [sys.executable, REPO / "pipelines" / "query.py", "--index", idx / "g", "--queries",
            work / "query.parquet", "--k", "100", "--quiet"]
    shutil.rmtree(work / "plain", ignore_errors=True)
    plain_s, plain_gb = run([*base, "--out", work / "plain"], work / "plain.log")
    plain = score(work, work / "plain", work / "eval_plain.log")
    print(f"query (no re-ranking): {plain_s} s, {plain_gb} GB, {plain}", flush=True)
    shutil.rmtree(work / "kr", ignore_errors=True)
    cmd = [*base, "--rerank", "kreciprocal", "--out", work / "kr"]
    if a.profile:
        spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))
        cmd = [spy, "record", "--rate", "20", "--format", "raw", "-o", a.profile, "--", *cmd]
    kr_s, kr_gb = run(cmd, work / "kr.log")
    kr = score(work, work / "kr", work / "eval_kr.log")
    print(f"query --rerank kreciprocal: {kr_s} s, {kr_gb} GB, {kr}"
          + (" (under py-spy)" if a.profile else ""), flush=True)
    shares = profile_shares(pathlib.Path(a.profile)) if a.profile else {}
    for name, share in list(shares.items())[:20]:
        print(f"   {share:6.1%}  {name}")
    result = {"queries": a.queries, "gallery": a.gallery, "dim": a.dim, "shards": a.shards,
              "index_type": a.index_type, "plain": {"wall_s": plain_s, "peak_rss_gb": plain_gb, **plain},
              "kreciprocal": {"wall_s": kr_s, "peak_rss_gb": kr_gb, **kr},
              "load_avg": os.getloadavg(), "profiled": bool(a.profile),
              "profile_inclusive_shares": {k: round(v, 4) for k, v in list(shares.items())[:30]},
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
