"""Peak RSS of pipelines/query.py at two query-file sizes: memory should follow --batch-size,
not the query file (issue 14, case 13: 1.53 GB at 200,000 queries, 2.57 GB at 600,000).

    python benchmarks/query_memory.py                       # 50,000 and 200,000 queries, D=512
    python benchmarks/query_memory.py --sizes 200000 600000 --rerank dba,aqe

Each query file is written as ONE Parquet row group (what pyarrow.parquet.write_table does up
to 1M rows), the case where a row-group reader holds the whole file. Each run is a fresh child
process (its own VmHWM, Linux); prints one JSON line per size.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import subprocess
import tempfile
import time

# VmHWM, not ru_maxrss: Linux carries the forking parent's peak into the child's ru_maxrss
# across exec, and the parent has just held a whole query file
CHILD = """
import sys
sys.path.insert(0, {root!r})
from pipelines import query
query.main({argv!r})
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print("PEAK_RSS_KB", hwm[0])
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000], help="query-file rows")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--gallery", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--rerank", default="none", help="query.py --rerank (default none)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args(argv)

    import numpy as np
    import pyarrow.parquet as pq

    from contracts.vectors import l2_normalize, make_embeddings_table
    from index.ann.build import BuildConfig, build_index

    root = str(pathlib.Path(__file__).resolve().parents[1])
    work = a.work or tempfile.mkdtemp(prefix="query_memory_")
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(0)
    g = l2_normalize(rng.normal(size=(a.gallery, a.dim)))
    n = len(g)
    pq.write_table(make_embeddings_table([f"g{i}" for i in range(n)], [str(i) for i in range(n)], [1] * n,
                                         ["gallery"] * n, g, "m1"), f"{work}/gallery.parquet")
    build_index(f"{work}/gallery.parquet", f"{work}/idx", "g", BuildConfig(index_type="flat"))
    for size in a.sizes:
        qpath = f"{work}/q{size}.parquet"
        x = l2_normalize(rng.normal(size=(size, a.dim)))
        pq.write_table(make_embeddings_table([f"q{i:07d}" for i in range(size)], ["1"] * size, [2] * size,
                                             ["query"] * size, x, "m1"), qpath, row_group_size=1 << 20)
        del x
        argv_q = ["--index", f"{work}/idx/g", "--queries", qpath, "--k", str(a.k), "--rerank", a.rerank,
                  "--batch-size", str(a.batch_size), "--out", f"{work}/res{size}"]
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=root, argv=argv_q)],
                             capture_output=True, text=True, check=True).stdout
        peak_kb = int(next(line for line in out.splitlines() if line.startswith("PEAK_RSS_KB")).split()[1])
        print(json.dumps({"queries": size, "dim": a.dim, "gallery": a.gallery, "k": a.k,
                          "batch_size": a.batch_size, "rerank": a.rerank,
                          "query_file_mb": round(os.path.getsize(qpath) / 2**20, 1),
                          "seconds": round(time.perf_counter() - t, 2),
                          "peak_rss_mb": round(peak_kb / 1024, 1)}), flush=True)
        os.remove(qpath)


if __name__ == "__main__":
    main()
