"""Nightly centroid update: incremental (diff + touched items) vs a full recompute.

    .venv/bin/python benchmarks/reindex.py [--rows 200000] [--dim 256] [--items 20000] [--changed 0.01]

Synthetic embeddings outputs (the embed layout: embeddings contract + content_hash) for two
nights that differ in `changed` of their rows (half added, half removed); prints seconds for
index.centroids.incremental.diff_embeddings + update_centroids and for compute_centroids, and checks that
both give the same centroids.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa


def write_night(path: str, ids: np.ndarray, items: np.ndarray, cams: np.ndarray, vecs: np.ndarray) -> None:
    import os

    from contracts.vectors import make_embeddings_table, write_table_atomic

    os.makedirs(path, exist_ok=True)
    t = make_embeddings_table(ids.astype(str), items.astype(str), cams, ["gallery"] * len(ids), vecs, "bench")
    t = t.append_column("content_hash", pa.array([f"h{i}" for i in ids], pa.string()))
    write_table_atomic(t, f"{path}/part-00000.parquet")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--changed", type=float, default=0.01, help="fraction of rows added + removed")
    args = p.parse_args()
    from contracts.vectors import l2_normalize, read_vectors
    from index.centroids import incremental

    rng = np.random.default_rng(0)
    n, k = args.rows, int(args.rows * args.changed / 2)
    total = n + k
    vecs = l2_normalize(rng.normal(size=(total, args.dim)).astype(np.float32))
    items = rng.integers(0, args.items, total)
    cams = rng.integers(1, 7, total)
    ids = np.arange(total)
    with tempfile.TemporaryDirectory() as d:
        old_rows = np.arange(n)
        new_rows = np.arange(k, total)  # k removed at the start, k added at the end
        write_night(f"{d}/old", ids[old_rows], items[old_rows], cams[old_rows], vecs[old_rows])
        write_night(f"{d}/new", ids[new_rows], items[new_rows], cams[new_rows], vecs[new_rows])
        incremental.compute_centroids(f"{d}/old", f"{d}/c_old")

        t = time.perf_counter()
        delta = incremental.diff_embeddings(f"{d}/old", f"{d}/new")
        t_diff = time.perf_counter() - t
        t = time.perf_counter()
        inc = incremental.update_centroids(f"{d}/c_old", delta, f"{d}/c_inc", "bench", args.dim)
        t_update = time.perf_counter() - t
        t = time.perf_counter()
        full = incremental.compute_centroids(f"{d}/new", f"{d}/c_full")
        t_full = time.perf_counter() - t

        a = read_vectors(f"{d}/c_inc/{incremental.CENTROIDS_FILE}", kind="centroids")
        b = read_vectors(f"{d}/c_full/{incremental.CENTROIDS_FILE}", kind="centroids")
        oa, ob = np.argsort(a.item_ids.astype(str)), np.argsort(b.item_ids.astype(str))
        err = float(np.abs(a.vectors[oa] - b.vectors[ob]).max())
    print(f"rows {n}, dim {args.dim}, items {args.items}, +{delta.n_added} -{delta.n_removed} rows, "
          f"{inc.touched_items} items touched of {full.items}")
    print(f"incremental: diff {t_diff:.2f} s + update {t_update:.2f} s = {t_diff + t_update:.2f} s")
    print(f"full recompute: {t_full:.2f} s")
    print(f"max |incremental - full| centroid difference: {err:.2e}")


if __name__ == "__main__":
    main()
