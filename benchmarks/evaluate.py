"""Time and peak memory of pipelines/evaluate.py on synthetic clustered embeddings.

    python benchmarks/evaluate.py --queries 3000 --gallery 20000 --dim 2048
    python benchmarks/evaluate.py --queries 20000 --gallery 1000000 --dim 128

Writes query/gallery Parquet files (embeddings contract) to --work, runs the real CLI in a child
process and reports its wall time and its own peak RSS (benchmarks/measure.py).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import platform
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from measure import run_measured

from contracts.vectors import l2_normalize, make_embeddings_table


def clustered(rng, n, centers, items, cams, noise=2.5):
    x = centers[items] + noise * rng.standard_normal((n, centers.shape[1]), dtype=np.float32) / np.sqrt(centers.shape[1])
    return l2_normalize(x)


def write_split(path, rng, n, centers, n_items, n_cams, split, block=200_000):
    """Write in blocks so that generating 1M x D never holds more than one block of float64."""
    import pyarrow.parquet as pq

    writer = None
    for start in range(0, n, block):
        m = min(block, n - start)
        items = rng.integers(1, n_items + 1, m)
        x = clustered(rng, m, centers, items - 1, None)
        t = make_embeddings_table([f"{split}/{start + i:08d}" for i in range(m)], items.astype(str),
                                  rng.integers(1, n_cams + 1, m), [split] * m, x, "bench")
        if writer is None:
            writer = pq.ParquetWriter(path, t.schema)
        writer.write_table(t)
    writer.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=3000)
    p.add_argument("--gallery", type=int, default=20000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--items", type=int, default=None, help="identities (default gallery/20)")
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--mode", default="instance", choices=["instance", "centroid", "both"])
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--json", default=None, help="append the figures to this JSON-lines file")
    args = p.parse_args()
    items = args.items or max(10, args.gallery // 20)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((items, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        q, g = f"{work}/q.parquet", f"{work}/g.parquet"
        write_split(q, rng, args.queries, centers, items, args.cameras, "query")
        write_split(g, rng, args.gallery, centers, items, args.cameras, "gallery")
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "evaluate.py"),
               "--query", q, "--gallery", g, "--mode", args.mode, "--out", f"{work}/report.json"]
        with open(f"{work}/out.log", "w+") as fo, open(f"{work}/err.log", "w+") as fe:
            code, wall, peak = run_measured(cmd, stdout=fo, stderr=fe)  # its own peak (measure.py)
            fo.seek(0), fe.seek(0)
            stdout, stderr = fo.read(), fe.read()
        if code:
            sys.exit(f"evaluate.py failed: {stderr.strip()}")
        peak_mb = peak / 2**20
    data_mb = (args.queries + args.gallery) * args.dim * 4 / 2**20
    fig = {"queries": args.queries, "gallery": args.gallery, "dim": args.dim, "mode": args.mode,
           "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb), "vectors_mb": round(data_mb),
           "machine": f"{platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}"}
    print(stdout.strip())
    print(json.dumps(fig))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(fig) + "\n")


if __name__ == "__main__":
    main()
