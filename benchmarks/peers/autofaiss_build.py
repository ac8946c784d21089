"""Index building: autofaiss `build_index` against `build_index.py --index-type auto`, same data,
same memory budget, one run.

    python benchmarks/peers/autofaiss_build.py                        # 1,000,000 x 256, 256 MiB
    python benchmarks/peers/autofaiss_build.py --n 200000 --budget-mb 64 --out /tmp/af.json

autofaiss pins its own numpy / faiss / pyarrow, so it runs from its own virtual environment,
made at run time with pip (`--venv`, default outputs/peers-cache/autofaiss-venv; nothing
vendored). The data is benchmarks/index.py's clustered unit vectors (low intrinsic dimension,
like real embeddings), written once as the project's embeddings Parquet and as the .npy files
autofaiss reads, plus --queries held-out queries from the same distribution and their exact
top-10 (faiss IndexFlatIP). Each step is its own process, timed from start to exit, with its
own peak RSS (benchmarks/measure.py):
- build: autofaiss `build_index(max_index_memory_usage=BUDGET, metric_type="ip")` with the
  machine's cores, and `pipelines/build_index.py --index-type auto --max-memory BUDGET`;
- search: each index loaded as its builder left it (autofaiss: its tuned `index_param`; ours:
  open_index with the tuned nprobe / efSearch of the manifest), all queries searched at k=10
  in batches of --batch: queries/s and recall@10 against the exact top-10.
Prints a table; writes JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
from measure import run_measured

# autofaiss pins numpy<2 (pyarrow 18+ needs numpy 2) and calls OPQMatrix(M=...), which faiss 1.9+ dropped
AUTOFAISS = ["autofaiss==2.18.0", "pyarrow<18", "faiss-cpu==1.8.0", "packaging"]  # faiss 1.8 imports packaging, undeclared

AUTOFAISS_BUILD = """
import json, sys
from autofaiss import build_index
emb, index_path, infos_path, budget, cores = sys.argv[1:6]
build_index(embeddings=emb, index_path=index_path, index_infos_path=infos_path,
            max_index_memory_usage=budget, current_memory_available="8G", metric_type="ip",
            nb_cores=int(cores), min_nearest_neighbors_to_retrieve=10, verbose=30)
"""

AUTOFAISS_SEARCH = """
import json, sys, time
import faiss, numpy as np
index_path, infos_path, queries, out, batch = sys.argv[1:6]
index = faiss.read_index(index_path)
param = json.load(open(infos_path)).get("index_param")
if param:
    faiss.ParameterSpace().set_index_parameters(index, param)
q = np.load(queries)
t = time.perf_counter()
ids = np.concatenate([index.search(q[s:s + int(batch)], 10)[1] for s in range(0, len(q), int(batch))])
json.dump({"search_s": time.perf_counter() - t, "param": param}, open(out + ".json", "w"))
np.save(out, ids)
"""

OURS_SEARCH = """
import json, sys, time
sys.path.insert(0, sys.argv[5])
import numpy as np
from index.ann.search import open_index
root, queries, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open_index(root) as index:
    q = np.load(queries)
    t = time.perf_counter()
    ids = np.concatenate([index.search(q[s:s + batch], 10, labels=False).ids for s in range(0, len(q), batch)])
    json.dump({"search_s": time.perf_counter() - t, "param": index.manifest.get("search_params")},
              open(out + ".json", "w"))
np.save(out, ids)
"""


def run(cmd: list, log: pathlib.Path) -> tuple[float, float]:
    """(wall s, peak RSS GB) of one child process (its own peak: benchmarks/measure.py); its
    output goes to `log`."""
    with open(log, "w") as f:
        code, wall, peak = run_measured(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"{pathlib.Path(str(cmd[1])).name} failed: {' | '.join(tail)}")
    return round(wall, 1), round(peak / 1e9, 3)


def ensure_venv(venv: pathlib.Path) -> pathlib.Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} with {' '.join(AUTOFAISS)} (pip, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *AUTOFAISS], check=True)
    return python


def write_data(work: pathlib.Path, n: int, dim: int, queries: int) -> None:
    """gallery.parquet (the project's embeddings), emb/part-0.npy (autofaiss), queries.npy, gt.npy."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from contracts.vectors import embeddings_schema, embeddings_to_arrow

    if (work / "gt.npy").exists():
        return
    make_data = _index_benchmark().make_data
    clusters = max(50, n // 1000)
    (work / "emb").mkdir(parents=True, exist_ok=True)
    flat = faiss.IndexFlatIP(dim)
    vecs = np.lib.format.open_memmap(work / "emb" / "part-0.npy", "w+", np.float32, (n, dim))
    schema = embeddings_schema(dim, "bench")
    off = 0
    with pq.ParquetWriter(work / "gallery.parquet", schema) as w:
        for x in make_data(n, dim, clusters, 24, seed=0):
            m = len(x)
            vecs[off:off + m] = x
            flat.add(x)
            w.write_table(pa.table([pa.array([f"g{i}" for i in range(off, off + m)]),
                                    pa.array([f"item{i // 4}" for i in range(off, off + m)]),
                                    pa.nulls(m, pa.int32()), pa.array(["gallery"] * m), embeddings_to_arrow(x)],
                                   schema=schema))
            off += m
    vecs.flush()
    del vecs
    q = next(make_data(queries, dim, clusters, 24, seed=1, chunk=queries))
    np.save(work / "queries.npy", q)
    np.save(work / "gt.npy", flat.search(q, 10)[1])


def _index_benchmark():
    """benchmarks/index.py as a module (its name would shadow the project's `index` package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("index_benchmark", REPO / "benchmarks" / "index.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def recall10(ids: np.ndarray, gt: np.ndarray) -> float:
    return round(float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, gt)])), 4)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--budget-mb", type=int, default=256, help="index memory budget for both, MiB (default 256)")
    p.add_argument("--batch", type=int, default=1000, help="queries per search call (default 1000)")
    p.add_argument("--work", default="outputs/peers-autofaiss")
    p.add_argument("--venv", default="outputs/peers-cache/autofaiss-venv")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    work = (pathlib.Path(a.work) / f"{a.n}x{a.dim}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(pathlib.Path(a.venv).resolve())
    t = time.perf_counter()
    write_data(work, a.n, a.dim, a.queries)
    print(f"data: {a.n} x {a.dim}, {a.queries} queries ({time.perf_counter() - t:.0f} s)", flush=True)
    gt = np.load(work / "gt.npy")
    cores = os.cpu_count() or 1
    budget_gib = a.budget_mb / 1024
    rows = []

    # autofaiss
    af_index, af_infos = work / "autofaiss.index", work / "autofaiss_infos.json"
    for f in (af_index, af_infos):
        f.unlink(missing_ok=True)
    b_s, b_gb = run([python, "-c", AUTOFAISS_BUILD, work / "emb", af_index, af_infos, f"{a.budget_mb}MB", cores],
                    work / "autofaiss_build.log")
    s_s, s_gb = run([python, "-c", AUTOFAISS_SEARCH, af_index, af_infos, work / "queries.npy", work / "af_ids.npy",
                     a.batch], work / "autofaiss_search.log")
    info = json.loads((work / "af_ids.npy.json").read_text())
    infos = json.loads(af_infos.read_text())
    rows.append({"builder": "autofaiss 2.18.0 build_index", "index": infos.get("index_key"),
                 "params": info["param"], "build_s": b_s, "build_peak_rss_gb": b_gb,
                 "index_bytes": af_index.stat().st_size, "search_process_s": s_s, "search_peak_rss_gb": s_gb,
                 "qps": round(a.queries / info["search_s"], 1),
                 "recall@10": recall10(np.load(work / "af_ids.npy"), gt)})

    # this project
    root = work / "ours"
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    b_s, b_gb = run([sys.executable, REPO / "pipelines" / "build_index.py", "--vectors", work / "gallery.parquet",
                     "--root", root, "--name", "g", "--index-type", "auto", "--max-memory", budget_gib,
                     "--version", "v1"], work / "ours_build.log")
    s_s, s_gb = run([sys.executable, "-c", OURS_SEARCH, root / "g", work / "queries.npy", work / "our_ids.npy",
                     a.batch, REPO], work / "ours_search.log")
    info = json.loads((work / "our_ids.npy.json").read_text())
    manifest = json.loads((root / "g" / "v1" / "manifest.json").read_text())
    rows.append({"builder": "build_index.py --index-type auto", "index": manifest["index_type"],
                 "params": info["param"], "build_s": b_s, "build_peak_rss_gb": b_gb,
                 "index_bytes": sum(e["bytes"] for name, e in manifest["files"].items() if name.endswith(".faiss")),
                 "search_process_s": s_s, "search_peak_rss_gb": s_gb,
                 "qps": round(a.queries / info["search_s"], 1),
                 "recall@10": recall10(np.load(work / "our_ids.npy"), gt)})

    print(f"\n{a.n} x {a.dim}, budget {a.budget_mb} MiB, {a.queries} queries at k=10, {cores} cores")
    print("| builder | index | build s | build peak GB | index MB | queries/s | recall@10 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['builder']} | {r['index']} | {r['build_s']} | {r['build_peak_rss_gb']} | "
              f"{r['index_bytes'] / 2**20:.0f} | {r['qps']} | {r['recall@10']} |")
    result = {"n": a.n, "dim": a.dim, "queries": a.queries, "budget_mb": a.budget_mb, "cores": cores,
              "machine": f"{platform.machine()}, {cores} cores", "load_avg": os.getloadavg(), "rows": rows,
              "command": "python benchmarks/peers/autofaiss_build.py " + " ".join(sys.argv[1:])}
    if a.out:
        out = pathlib.Path(a.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
