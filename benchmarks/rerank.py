"""Scalable k-reciprocal re-ranking: time and peak memory at scale, and agreement with exact.

Two parts, each run in its own process so that peak memory (ru_maxrss) is its own:
- scale: Q queries x G gallery synthetic clustered vectors (default 10,000 x 300,000, D=128),
  neighbour lists from a FAISS index (--index flat: exact IndexFlatIP; ivf: IndexIVFFlat),
  k_reciprocal_sparse to top-k lists. Reports seconds per stage, peak RSS, and mAP@k of the
  plain search vs re-ranked lists.
- agree: a size where the exact dense form runs (default 1,000 x 10,000): mAP / Rank-1 of the
  plain ranking, exact form, sparse form with exact (flat) and approximate (IVF) neighbours,
  and how many top-k lists are identical.

    python benchmarks/rerank.py                       # both parts, default sizes
    python benchmarks/rerank.py --part scale --queries 2000 --gallery 50000
    python benchmarks/rerank.py --out rerank.json

Prints the figures and writes them as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from measure import own_peak_rss_bytes


def clustered_vectors(num_query: int, num_gallery: int, dim: int, per_item: int, seed: int = 0,
                      group_size: int = 20, spread: float = 0.8, noise: float = 1.2):
    """Synthetic ReID-like vectors: items in groups of look-alikes (hard negatives), per_item
    gallery images per item, one query per item for the first num_query items (a fresh sample).
    Returns query (Q, D), gallery (G, D) float32 L2-normalised, query_items (Q,), gallery_items (G,)."""
    rng = np.random.default_rng(seed)
    n_items = max(1, -(-num_gallery // per_item))
    n_groups = max(1, n_items // group_size)
    groups = rng.standard_normal((n_groups, dim), dtype=np.float32)
    centres = groups[rng.integers(0, n_groups, n_items)]
    centres += np.float32(spread) * rng.standard_normal((n_items, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = np.float32(noise / np.sqrt(dim))

    def sample(items):
        x = centres[items]
        x += scale * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    gallery_items = np.repeat(np.arange(n_items), per_item)[:num_gallery]
    query_items = rng.permutation(n_items)[:num_query] if num_query <= n_items \
        else rng.integers(0, n_items, num_query)
    return sample(query_items), sample(gallery_items), query_items, gallery_items


def peak_rss_bytes() -> int:
    return own_peak_rss_bytes()  # its own, not its parent's (measure.py)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): a figure that a shared CPU
    disturbs less than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def make_search(vectors: np.ndarray, kind: str, nlist: int, nprobe: int):
    """Search function over `vectors` and the seconds it took to build."""
    import faiss

    from index.rerank.neighbours import flat_search_fn

    t = time.perf_counter()
    if kind == "flat":
        fn = flat_search_fn(vectors)
    else:
        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        train = vectors[np.random.default_rng(1).permutation(len(vectors))[:max(40 * nlist, 10000)]]
        index.train(train)
        index.add(vectors)
        index.nprobe = nprobe

        def fn(x, k, _index=index):
            out_s = np.empty((len(x), k), np.float32)
            out_i = np.empty((len(x), k), np.int64)
            for s in range(0, len(x), 16384):
                out_s[s:s + 16384], out_i[s:s + 16384] = _index.search(
                    np.ascontiguousarray(x[s:s + 16384]), k)
            return out_s, out_i
    return fn, time.perf_counter() - t


def neighbour_recall(x: np.ndarray, search, k: int, sample: int = 300, seed: int = 2) -> float:
    """Recall@k of `search` against brute force, over a sample of the rows of x (n, D)."""
    rows = np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False)
    _, ids = search(x[rows], k)
    sims = x[rows] @ x.T
    true = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, true)]))


def metrics_at_k(ids: np.ndarray, query_items, gallery_items, k: int) -> dict:
    """mAP@k and Rank-1 from top-k lists (fashion rule: no cameras), via index.evaluation.metrics."""
    from index.evaluation import metrics as M

    codes = M.encode_labels(query_items.astype(str), gallery_items.astype(str))
    n_rel = M.relevant_counts(codes)
    ranked = np.where(ids >= 0, codes.gallery_items[np.maximum(ids, 0)], -3)
    out = np.array([M.ranked_list_metrics(ranked[i], None, int(codes.query_items[i]), None,
                                          codes.junk, int(n_rel[i]), k) for i in range(len(ids))])
    pq = M.PerQueryMetrics(out[:, 0], out[:, 1], out[:, 2].astype(np.int64), out[:, 3].astype(np.int64))
    s = M.summarize(pq)
    return {"mAP@k": s["mAP"], "rank1": s["cmc"]["1"]}


def dense_metrics(scores: np.ndarray, query_items, gallery_items) -> dict:
    """Exact mAP / Rank-1 over whole rankings. scores: (Q, G), higher is better."""
    from index.evaluation import metrics as M

    codes = M.encode_labels(query_items.astype(str), gallery_items.astype(str))
    s = M.summarize(M.metrics_from_scores(scores, codes, np.arange(len(scores))))
    return {"mAP": s["mAP"], "rank1": s["cmc"]["1"]}


def part_scale(a) -> dict:
    from index.rerank.kreciprocal import k_reciprocal_sparse

    t0 = time.perf_counter()
    q, g, qi, gi = clustered_vectors(a.queries, a.gallery, a.dim, a.per_item, a.seed)
    t_data = time.perf_counter() - t0
    union = np.concatenate([q, g])
    search, t_build = make_search(union, a.index, a.nlist, a.nprobe)
    recall = neighbour_recall(union, search, a.k1 + 1)
    rss_before = current_rss_bytes()
    stages: dict = {}
    cpu0 = cpu_seconds()
    t1 = time.perf_counter()
    res = k_reciprocal_sparse(q, g, a.k1, a.k2, a.lambda_value, topk=a.topk, search_fn=search,
                              max_distance=a.max_distance if a.max_distance in ("search", "sample")
                              else float(a.max_distance), stats=stages)
    t_rerank = time.perf_counter() - t1
    cpu_rerank = cpu_seconds() - cpu0
    peak = peak_rss_bytes()
    # plain search baseline over the gallery part of the same index
    _, ids = search(q, a.topk + 1 + min(a.queries, a.topk))
    ids = np.where(ids >= len(q), ids - len(q), -1)
    base = np.full((len(q), a.topk), -1, np.int64)
    for r in range(len(q)):
        row = ids[r][ids[r] >= 0][:a.topk]
        base[r, :len(row)] = row
    return {
        "part": "scale", "queries": a.queries, "gallery": a.gallery, "dim": a.dim, "index": a.index,
        "nlist": a.nlist if a.index == "ivf" else None, "nprobe": a.nprobe if a.index == "ivf" else None,
        "k1": a.k1, "k2": a.k2, "lambda": a.lambda_value, "topk": a.topk, "max_distance": a.max_distance,
        "seconds_data": round(t_data, 2), "seconds_index_build": round(t_build, 2),
        "seconds_rerank": round(t_rerank, 2), "cpu_seconds_rerank": round(cpu_rerank, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 1), "stages": stages,
        "rss_before_rerank_gib": round(rss_before / 2**30, 3), "peak_rss_gib": round(peak / 2**30, 3),
        "certified_fraction": float(res.certified.mean()),
        "neighbour_recall_at_k1+1": recall,
        "plain": metrics_at_k(base, qi, gi, a.topk),
        "kreciprocal": metrics_at_k(res.ids, qi, gi, a.topk),
    }


def part_agree(a) -> dict:
    from index.rerank.kreciprocal import k_reciprocal_from_embeddings, k_reciprocal_sparse

    q, g, qi, gi = clustered_vectors(a.agree_queries, a.agree_gallery, a.dim, a.per_item, a.seed)
    out = {"part": "agree", "queries": len(q), "gallery": len(g), "dim": a.dim, "topk": a.topk}
    out["plain"] = dense_metrics(q @ g.T, qi, gi)
    t = time.perf_counter()
    exact = k_reciprocal_from_embeddings(q, g, a.k1, a.k2, a.lambda_value)
    out["seconds_exact"] = round(time.perf_counter() - t, 2)
    out["exact"] = dense_metrics(-exact, qi, gi)
    exact_top = np.argsort(exact, axis=1, kind="stable")[:, :a.topk]
    out["exact"].update(metrics_at_k(exact_top, qi, gi, a.topk))
    md = a.max_distance if a.max_distance in ("search", "sample") else float(a.max_distance)
    for kind, norm in (("flat", "search"), ("flat", "sample"), ("ivf", md)):
        search, _ = make_search(np.concatenate([q, g]), kind, a.agree_nlist, a.nprobe)
        t = time.perf_counter()
        res = k_reciprocal_sparse(q, g, a.k1, a.k2, a.lambda_value, topk=a.topk, search_fn=search,
                                  max_distance=norm)
        sec = time.perf_counter() - t
        m = dense_metrics(res.dense_scores(len(g)), qi, gi)
        m.update(metrics_at_k(res.ids, qi, gi, a.topk))
        m["seconds"] = round(sec, 2)
        m["max_distance"] = norm
        m["identical_topk_lists"] = float((res.ids == exact_top).all(axis=1).mean())
        m["max_abs_distance_diff"] = float(np.nanmax(np.abs(
            np.take_along_axis(exact, exact_top, axis=1) - res.distances)))
        m["mAP_diff_points"] = round(100 * (m["mAP"] - out["exact"]["mAP"]), 3)
        m["certified_fraction"] = float(res.certified.mean())
        if kind == "ivf":
            m["neighbour_recall_at_k1+1"] = neighbour_recall(np.concatenate([q, g]), search, a.k1 + 1)
        out[f"sparse_{kind}_{norm}"] = m
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "scale", "agree"), default="all",
                   help="which measurement to run (all: each in its own process)")
    p.add_argument("--queries", type=int, default=10000, help="queries at scale")
    p.add_argument("--gallery", type=int, default=300000, help="gallery vectors at scale")
    p.add_argument("--agree-queries", type=int, default=1000, help="queries for exact-vs-sparse")
    p.add_argument("--agree-gallery", type=int, default=10000, help="gallery for exact-vs-sparse")
    p.add_argument("--dim", type=int, default=128, help="vector dimension")
    p.add_argument("--per-item", type=int, default=10, help="gallery images per item")
    p.add_argument("--index", choices=("flat", "ivf"), default="ivf",
                   help="neighbour search at scale: exact flat or IVF-Flat")
    p.add_argument("--nlist", type=int, default=2048, help="IVF lists at scale")
    p.add_argument("--agree-nlist", type=int, default=256, help="IVF lists at the agreement size")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed")
    p.add_argument("--k1", type=int, default=20)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--lambda-value", type=float, default=0.3)
    p.add_argument("--topk", type=int, default=100, help="re-ranked results per query")
    p.add_argument("--max-distance", default="search",
                   help="row normaliser: 'search' (farthest-point search), 'sample' (farthest of "
                        "8,192 sampled points) or a constant such as 4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.part == "all":
        results = []
        for part in ("agree", "scale"):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                args = [x for x in (argv if argv is not None else sys.argv[1:])]
                args = [x for i, x in enumerate(args) if x != "--out" and (i == 0 or args[i - 1] != "--out")]
                subprocess.run([sys.executable, __file__, *args, "--part", part, "--out", f.name], check=True)
                results.append(json.loads(pathlib.Path(f.name).read_text()))
        out = {"agree": results[0], "scale": results[1]}
    else:
        out = part_scale(a) if a.part == "scale" else part_agree(a)
        print(json.dumps(out, indent=2), flush=True)
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
