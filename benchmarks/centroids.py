"""Centroids benchmark: pipelines/centroids.py (Ray Data groupby-mean) vs one numpy np.add.at pass.

    python benchmarks/centroids.py                       # 300,000 x 2,048 float32, 30,000 items
    python benchmarks/centroids.py --rows 60000 --items 6000   # smaller

Generates L2-normalised random embeddings (items in gallery order, i.e. an item's images next
to each other as a make_shards -> embed run writes them; --order random shuffles the rows),
6 cameras, written as Parquet parts (not timed). Then, each in its own process so peak memory
is its own:
  numpy     read the embeddings whole, then one np.add.at pass into (items, D) float64 sums
            (+ counts, mean, normalise): the time of the np.add.at pass and of the whole process;
  pipeline  python pipelines/centroids.py --embeddings ... --out ... (embedded local Ray):
            wall time, and peak memory = the highest sum of PSS over the job's whole process tree
            (driver, raylet with its object store, workers), sampled every 0.25 s.
Checks the pipeline's centroids against the numpy ones (max abs difference) and prints figures.
Goals (issue 4): pipeline time <= 3x the np.add.at pass; peak memory <= 2x the data size.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from measure import own_peak_rss_bytes

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30


def generate(out: pathlib.Path, rows: int, dim: int, items: int, cameras: int, files: int,
             order: str, seed: int = 0) -> None:
    """Write the embeddings contract in `files` parts, chunk by chunk (bounded memory)."""
    from contracts.vectors import make_embeddings_table, write_table_atomic

    rng = np.random.default_rng(seed)
    # every item present at least once; grouped = sorted by item, random = shuffled
    item_of_row = np.sort(np.concatenate([np.arange(items), rng.integers(0, items, rows - items)]))
    if order == "random":
        item_of_row = rng.permutation(item_of_row)
    cams = rng.integers(1, cameras + 1, rows).astype(np.int32)
    out.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for k in range(files):
        s, e = k * per, min(rows, (k + 1) * per)
        x = rng.standard_normal((e - s, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t = make_embeddings_table([f"img{i:07d}" for i in range(s, e)], [f"{i:05d}" for i in item_of_row[s:e]],
                                  cams[s:e], ["gallery"] * (e - s), x, "bench-model")
        write_table_atomic(t, str(out / f"part-{k:03d}.parquet"))


def numpy_pass(emb: str, result: str) -> None:
    """Child process: read whole, one np.add.at pass; writes timings + centroids to `result`."""

    import pyarrow.dataset as pads

    t0 = time.perf_counter()
    # read into one preallocated (N, D) float32 array: the data once, plus one batch at a time
    ds = pads.dataset(emb, format="parquet")
    n, dim = ds.count_rows(), ds.schema.field("embedding").type.list_size
    x = np.empty((n, dim), np.float32)
    item_ids = []
    pos = 0
    for b in ds.to_batches(columns=["item_id", "embedding"], batch_size=16384):
        x[pos:pos + b.num_rows] = b.column("embedding").flatten().to_numpy().reshape(-1, dim)
        item_ids.extend(b.column("item_id").to_pylist())
        pos += b.num_rows
    t1 = time.perf_counter()
    items, inv = np.unique(np.asarray(item_ids), return_inverse=True)
    sums = np.zeros((len(items), dim))
    t2 = time.perf_counter()
    np.add.at(sums, inv, x)
    t3 = time.perf_counter()
    counts = np.bincount(inv, minlength=len(items))
    means = sums / counts[:, None]
    cents = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
    t4 = time.perf_counter()
    np.save(result + ".npy", cents)
    peak = own_peak_rss_bytes()  # its own, not its parent's (measure.py)
    with open(result, "w") as f:
        json.dump({"read_s": t1 - t0, "unique_s": t2 - t1, "add_at_s": t3 - t2, "finalise_s": t4 - t3,
                   "total_s": t4 - t0, "peak_bytes": peak, "items": items.tolist()}, f)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pss(pid: int) -> int:
    """Sum of PSS (shared pages split between their users, so Ray's shared-memory object store
    counts once) over a process and all its descendants, from /proc/PID/smaps_rollup."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def run_pipeline(emb: str, out: str, num_cpus: int, batch_size: int, sums_dtype: str) -> dict:
    cmd = [sys.executable, str(REPO / "pipelines" / "centroids.py"), "--embeddings", emb, "--out", out,
           "--num-cpus", str(num_cpus), "--batch-size", str(batch_size), "--sums-dtype", sums_dtype]
    peak = [0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    log = proc.communicate()[0]
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed ({proc.returncode}):\n{log[-3000:]}")
    job_line = [ln for ln in log.splitlines() if ln.startswith("centroids:")]
    return {"wall_s": wall, "peak_bytes": peak[0], "log": job_line}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--items", type=int, default=30_000)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--files", type=int, default=16, help="Parquet parts the embeddings are written in")
    p.add_argument("--order", choices=["grouped", "random"], default="grouped",
                   help="row order: an item's images together (as embed writes a gallery) or shuffled")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs for the pipeline's local Ray")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--sums-dtype", choices=["float32", "float64"], default="float32",
                   help="the pipeline's --sums-dtype")
    p.add_argument("--workdir", default=None, help="where the data go (default: a temporary folder)")
    p.add_argument("--numpy-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.numpy_child:
        numpy_pass(*args.numpy_child)
        return
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench-centroids-"))
    emb, out = work / "emb", work / "out"
    data_bytes = args.rows * args.dim * 4
    print(f"data: {args.rows} x {args.dim} float32 = {data_bytes / GIB:.2f} GiB, {args.items} items, "
          f"{args.cameras} cameras, order {args.order}, {args.files} files; Ray CPUs {args.num_cpus}, "
          f"machine CPUs {os.cpu_count()}", flush=True)
    try:
        t = time.perf_counter()
        generate(emb, args.rows, args.dim, args.items, args.cameras, args.files, args.order)
        print(f"generated in {time.perf_counter() - t:.1f}s", flush=True)

        res_file = str(work / "numpy.json")
        subprocess.run([sys.executable, __file__, "--numpy-child", str(emb), res_file], check=True)
        with open(res_file) as f:
            ref = json.load(f)
        print(f"numpy: read {ref['read_s']:.2f}s, np.unique {ref['unique_s']:.2f}s, "
              f"np.add.at {ref['add_at_s']:.2f}s, finalise {ref['finalise_s']:.2f}s; "
              f"peak RSS {ref['peak_bytes'] / GIB:.2f} GiB", flush=True)

        pipe = run_pipeline(str(emb), str(out), args.num_cpus, args.batch_size, args.sums_dtype)
        print("\n".join(pipe["log"]), flush=True)

        from contracts.vectors import read_vectors

        got = read_vectors(str(out / "centroids.parquet"), kind="centroids")
        order = np.argsort(got.item_ids.astype(str))
        cents = np.load(res_file + ".npy")
        assert list(got.item_ids[order]) == ref["items"], "item sets differ"
        diff = float(np.abs(got.vectors[order] - cents).max())
        ratio_t = pipe["wall_s"] / ref["add_at_s"]
        ratio_m = pipe["peak_bytes"] / data_bytes
        print(f"pipeline: wall {pipe['wall_s']:.2f}s (incl. Ray start), peak PSS {pipe['peak_bytes'] / GIB:.2f} GiB; "
              f"max |pipeline - numpy| = {diff:.2e}")
        print(f"RESULT time pipeline/np.add.at = {ratio_t:.2f}x (goal <= 3), "
              f"pipeline/numpy-process = {pipe['wall_s'] / ref['total_s']:.2f}x; "
              f"peak memory = {ratio_m:.2f}x data (goal <= 2), numpy process {ref['peak_bytes'] / data_bytes:.2f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
