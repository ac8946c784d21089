"""Index benchmark: build time, index bytes, queries/s and recall@10 of Flat, IVF-Flat, IVF-PQ,
HNSW and auto against numpy brute force (matmul + argpartition), all in one run.

    python benchmarks/index.py                      # 1,000,000 x 256, 10,000 queries, k=100
    python benchmarks/index.py --n 200000 --queries 2000 --types flat,ivf,ivfpq,hnsw,auto

Data: clustered synthetic unit vectors with a low intrinsic dimension (cluster centre + a
point in a shared low-rank subspace + small isotropic noise), like real embeddings; IVF on
i.i.d. gaussians is meaningless. Queries come from the same distribution (not from the
gallery). Every index goes through the real path: Parquet -> pipelines' build_index
(streamed, tuned to --target-recall on held-out vectors) -> open_index -> sharded search.
Goal: auto reaches recall@10 >= 0.95 at >= 20x the brute-force queries/s.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="gallery vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=256, help="dimension (default 256)")
    p.add_argument("--queries", type=int, default=10_000, help="queries (default 10,000)")
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--clusters", type=int, default=None, help="clusters (default n/1000, >= 50)")
    p.add_argument("--intrinsic-dim", type=int, default=24, help="rank of the within-cluster subspace")
    p.add_argument("--shards", type=int, default=1, help="shards per index (default 1)")
    p.add_argument("--types", default="flat,ivf,ivfpq,hnsw,auto",
                   help="semicolon/comma list of index types: aliases of build_index (flat, ivf, hnsw, "
                        "auto), ivfpq (here: IVF<nlist>,PQ<dim/4> without OPQ, whose training is slow "
                        "on small machines) or FAISS factory strings separated by ';'")
    p.add_argument("--target-recall", type=float, default=0.95, help="tuning target recall@10")
    p.add_argument("--batch", type=int, default=2048, help="queries per search call (default 2048)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--out", default="outputs/bench_index.json", help="JSON results path")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_data(n: int, dim: int, clusters: int, rank: int, seed: int, basis_seed: int = 1234,
              chunk: int = 100_000, spread: float = 0.6, noise: float = 0.1):
    """Yield (n_chunk, dim) float32 unit vectors: centre + low-rank offset + small noise."""
    from contracts.vectors import l2_normalize

    g = np.random.default_rng(basis_seed)  # the shared structure (same for gallery and queries)
    centres = g.normal(size=(clusters, dim)).astype(np.float32)
    basis = (g.normal(size=(rank, dim)) / np.sqrt(rank)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = rng.integers(0, clusters, m)
        z = rng.normal(size=(m, rank)).astype(np.float32)
        # per-dimension std: centre 1, within-cluster offset `spread`, isotropic noise `noise`
        x = centres[c] + spread * (z @ basis) + noise * rng.normal(size=(m, dim)).astype(np.float32)
        yield l2_normalize(x)


def write_gallery(path: str, args, clusters: int) -> np.ndarray:
    """Stream the gallery into one Parquet file (many row groups); return it as (N, D) for brute force."""
    from contracts.vectors import embeddings_schema, embeddings_to_arrow

    out = np.empty((args.n, args.dim), np.float32)
    schema = embeddings_schema(args.dim, "bench")
    off = 0
    with pq.ParquetWriter(path, schema) as w:
        for x in make_data(args.n, args.dim, clusters, args.intrinsic_dim, args.seed):
            m = len(x)
            out[off:off + m] = x
            ids = [f"g{i}" for i in range(off, off + m)]
            w.write_table(pa.table([pa.array(ids), pa.array([f"item{i // 4}" for i in range(off, off + m)]),
                                    pa.nulls(m, pa.int32()), pa.array(["gallery"] * m), embeddings_to_arrow(x)],
                                   schema=schema))
            off += m
    return out


def recall10(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, gt)]))


def save(path: str, env: dict, args, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"env": env, "args": vars(args), "rows": rows}, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import faiss

    from index.ann.build import BuildConfig, build_index
    from index.ann.search import exact_search, open_index

    clusters = args.clusters or max(50, args.n // 1000)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-index-")
    os.makedirs(work, exist_ok=True)
    env = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "clusters": clusters,
           "shards": args.shards, "cpus": os.cpu_count(), "faiss": faiss.__version__,
           "faiss_omp_threads": faiss.omp_get_max_threads(), "gpus": faiss.get_num_gpus(),
           "python": platform.python_version(), "load_avg_start": os.getloadavg()}
    print(json.dumps(env), flush=True)
    try:
        t = time.perf_counter()
        gallery = write_gallery(os.path.join(work, "gallery.parquet"), args, clusters)
        queries = np.concatenate(list(make_data(args.queries, args.dim, clusters, args.intrinsic_dim,
                                                args.seed + 1)))
        print(f"data: {time.perf_counter() - t:.1f}s", flush=True)

        t = time.perf_counter()
        _, gt_i = exact_search(queries, gallery, args.k)
        bf_s = time.perf_counter() - t
        rows = [{"index": "numpy brute force", "factory": "matmul+argpartition", "build_s": 0.0,
                 "bytes": int(gallery.nbytes), "qps": args.queries / bf_s, "search_s": bf_s,
                 "recall@10": 1.0, "params": {}, "speedup": 1.0}]
        print(f"brute force: {bf_s:.1f}s, {args.queries / bf_s:.1f} q/s", flush=True)
        del gallery  # indexes are searched from their files from here on

        from index.ann.build import nlist_for

        sep = ";" if ";" in args.types else ","
        for kind in [s.strip() for s in args.types.split(sep) if s.strip()]:
            name, label = kind.replace(",", "_"), kind
            if kind == "ivfpq":
                kind = f"IVF{nlist_for(-(-args.n // args.shards))},PQ{args.dim // 4}np"
            t = time.perf_counter()
            res = build_index(os.path.join(work, "gallery.parquet"), os.path.join(work, "idx"), name,
                              BuildConfig(shards=args.shards, index_type=kind, target_recall=args.target_recall,
                                          seed=args.seed),
                              progress=lambda m: print("  " + m, flush=True))
            build_s = time.perf_counter() - t
            m = res.manifest
            nbytes = sum(v["bytes"] for f, v in m["files"].items() if f.endswith(".faiss"))
            with open_index(os.path.join(work, "idx", name)) as idx:
                idx.search(queries[:64], args.k, labels=False)  # warm-up (page in the mmaps)
                t = time.perf_counter()
                got = [idx.search(queries[i:i + args.batch], args.k, labels=False).ids
                       for i in range(0, len(queries), args.batch)]
                search_s = time.perf_counter() - t
            ids = np.concatenate(got)
            row = {"index": label, "factory": m["index_type"], "build_s": build_s, "bytes": nbytes,
                   "qps": args.queries / search_s, "search_s": search_s, "recall@10": recall10(ids, gt_i),
                   "recall@100": float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, gt_i)])),
                   "params": m["search_params"], "tuned_recall@10": m["recall"]["recall@10"],
                   "speedup": (args.queries / search_s) / rows[0]["qps"], "timings": m["build"]["timings"]}
            rows.append(row)
            print(f"  {kind}: {json.dumps(row)}", flush=True)
            save(args.out, env, args, rows)  # partial results survive an interrupted run
            shutil.rmtree(res.path, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    env["load_avg_end"] = os.getloadavg()
    print()
    print(f"{args.n} x {args.dim}, {args.queries} queries, k={args.k}, {args.shards} shard(s), "
          f"{env['cpus']} CPUs, faiss {env['faiss']}")
    hdr = f"{'index':<18} {'factory':<28} {'build s':>8} {'MiB':>8} {'q/s':>9} {'x brute':>8} {'R@10':>6}  params"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['index']:<18} {r['factory']:<28} {r['build_s']:>8.1f} {r['bytes'] / 2**20:>8.1f} "
              f"{r['qps']:>9.1f} {r['speedup']:>8.1f} {r['recall@10']:>6.3f}  {r['params']}")
    auto = next((r for r in rows if r["index"] == "auto"), None)
    if auto:
        ok = auto["recall@10"] >= 0.95 and auto["speedup"] >= 20
        print(f"goal (auto recall@10 >= 0.95 at >= 20x brute force): {'MET' if ok else 'NOT MET'}")
    save(args.out, env, args, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
