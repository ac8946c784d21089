"""Index size and search speed against the PCA-whitening dimension (build_index --whiten).

    python benchmarks/whiten_index.py --gallery /tmp/scale/emb --queries /tmp/scale/qemb \
        --out benchmarks/results/whiten_index.json

Fits one square-root PCA-whitening on the gallery embeddings (pipelines/whiten.py's code,
streamed), then for each --dims builds an exact (Flat) single-shard index of the whitened
gallery through index.ann.build.build_index (the whitening stored with the version) and times
`ShardedIndex.search` of the raw queries (whitened by the index) at k=100, best of 3.
Prints one line per dimension: index bytes, queries/s, and the overlap of its top-10 with
that of the raw vectors (how much of the neighbourhood the reduction keeps).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import tempfile
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", required=True, help="gallery embeddings (Parquet file or folder)")
    p.add_argument("--queries", required=True, help="query embeddings of the same model")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--n-queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results/whiten_index.json")
    a = p.parse_args()

    import faiss

    from contracts.vectors import read_vectors
    from index.ann.build import BuildConfig, build_index
    from index.ann.search import open_index
    from index.ann.whitening import fit_whitening_file

    q = read_vectors(a.queries)
    queries, model = q.vectors[:a.n_queries], q.meta.model
    work = pathlib.Path(tempfile.mkdtemp(prefix="whiten_index_"))
    t = time.perf_counter()
    w = fit_whitening_file(a.gallery, max(a.dims), power=0.5)
    npz = work / "pcaw.npz"
    w.save(str(npz))
    fit_s = time.perf_counter() - t
    print(f"fitted {w.input_dim} -> {w.dim} on {w.n_samples} vectors in {fit_s:.1f}s", flush=True)
    rows, ref_top = [], None
    for dim in [None, *sorted(a.dims)]:
        cfg = BuildConfig(shards=1, index_type="flat", whitening=None if dim is None else str(npz),
                          whiten_dim=dim)
        t = time.perf_counter()
        res = build_index(a.gallery, str(work / "idx"), f"d{dim or 'raw'}", cfg)
        build_s = time.perf_counter() - t
        idx = open_index(res.path)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            hits = idx.search(queries, a.k, labels=False, model=model)
            best = min(best, time.perf_counter() - t)
        top = hits.ids[:, :10]
        ref_top = top if ref_top is None else ref_top
        overlap = float(np.mean([len(np.intersect1d(x, y)) / 10 for x, y in zip(top, ref_top)]))
        size = sum(os.path.getsize(os.path.join(res.path, f)) for f in os.listdir(res.path) if f.endswith(".faiss"))
        row = {"dim": dim or w.input_dim, "whitened": dim is not None, "index_mib": round(size / 2**20, 1),
               "queries_per_s": round(len(queries) / best, 1), "build_s": round(build_s, 1),
               "top10_overlap_with_raw": round(overlap, 3)}
        rows.append(row)
        print(row, flush=True)
        idx.close()
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gallery": a.gallery, "gallery_vectors": w.n_samples, "queries": len(queries),
                               "k": a.k, "faiss_threads": faiss.omp_get_max_threads(), "fit_s": round(fit_s, 1),
                               "rows": rows}, indent=1) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
