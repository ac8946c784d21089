"""Speed of the retrieval-toolkit pieces on synthetic data (prints figures; asserts nothing).

    python benchmarks/retrieval_toolkit.py                       # defaults: a few seconds each
    python benchmarks/retrieval_toolkit.py --gallery 20000 --dim 2048 --graph-k 30

- pooling: GeM / R-MAC forward+backward on a (B, C, 16, 8) map (ReID 256x128, last stride 1)
- AP loss: forward+backward on a P x M batch
- whitening: streaming fit (covariance accumulation + eigh) and apply, vectors/s
- diffusion: graph build from FAISS kNN lists, online CG per query, offline precompute
  (Yang et al.) and its online stage per query
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import platform
import time

import numpy as np


def report(results, key, value):
    """Record and print at once, so a long run still shows what it measured."""
    results[key] = value
    print(f"{key}: {value}", flush=True)


def timed(fn, repeat=3):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_pooling(args, results):
    import torch

    from model.ap_loss import ap_loss
    from model.pooling import build_pooling

    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, args.channels, 16, 8, requires_grad=True)
    for name in ("avg", "gem", "rmac"):
        pool = build_pooling(name)

        def step(pool=pool):
            out = pool(x)
            out.sum().backward()
            return out

        t, _ = timed(step)
        report(results, f"pool_{name}_fwd_bwd_ms", round(1000 * t, 2))
    labels = torch.arange(args.batch // 4).repeat_interleave(4)
    feat = torch.randn(len(labels), args.channels, requires_grad=True)

    def ap_step():
        loss = ap_loss(feat, labels)
        loss.backward()
        return loss

    t, _ = timed(ap_step)
    report(results, "ap_loss_fwd_bwd_ms", round(1000 * t, 2))


def clustered(rng, n, d, n_items=None):
    n_items = n_items or max(2, n // 8)
    centers = rng.standard_normal((n_items, d), dtype=np.float32)
    items = rng.integers(0, n_items, n)
    x = centers[items] + 1.5 * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), items


def bench_whitening(args, results, x):
    from index.ann.whitening import fit_whitening

    def fit():
        batches = (x[i:i + 8192] for i in range(0, len(x), 8192))
        return fit_whitening(batches, dim=min(args.white_dim, x.shape[1]))

    t, w = timed(fit, repeat=1)
    report(results, "whiten_fit_s", round(t, 3))
    report(results, "whiten_fit_vectors_per_s", round(len(x) / t))
    t, _ = timed(lambda: w.apply(x))
    report(results, "whiten_apply_vectors_per_s", round(len(x) / t))


def bench_diffusion(args, results, x):
    import faiss

    from index.rerank.diffusion import (
        build_graph,
        diffuse,
        diffuse_precomputed,
        diffuse_truncated,
        precompute_diffusion,
    )

    faiss.omp_set_num_threads(args.threads)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    t, (sims, ids) = timed(lambda: index.search(x, args.graph_k + 1), repeat=1)
    report(results, "knn_graph_search_s", round(t, 3))
    t, graph = timed(lambda: build_graph(ids, sims, gamma=3.0), repeat=1)
    report(results, "graph_build_s", round(t, 3))
    report(results, "graph_edges", int(graph.nnz))
    q = x[: args.queries]
    qs, qi = index.search(q, args.graph_k)
    t, _ = timed(lambda: diffuse(graph, qi, qs, topk=100, query_k=10, maxiter=20), repeat=1)
    report(results, "diffuse_online_ms_per_query", round(1000 * t / len(q), 2))
    m = min(args.truncate, len(x))
    qs_m, qi_m = index.search(q, m)
    t, _ = timed(lambda: diffuse_truncated(graph, qi_m, qs_m, topk=100, query_k=10, maxiter=20),
                 repeat=1)
    report(results, f"diffuse_truncated_m{m}_ms_per_query", round(1000 * t / len(q), 2))
    n_off = min(len(x), args.offline_rows)
    sub = x[:n_off]
    sub_index = faiss.IndexFlatIP(sub.shape[1])
    sub_index.add(sub)
    s2, i2 = sub_index.search(sub, args.graph_k + 1)
    g2 = build_graph(i2, s2)
    t, pre = timed(lambda: precompute_diffusion(g2, keep=200, maxiter=20), repeat=1)
    report(results, "offline_rows", n_off)
    report(results, "offline_precompute_s", round(t, 3))
    qs2, qi2 = sub_index.search(q, args.graph_k)
    t, _ = timed(lambda: diffuse_precomputed(pre, qi2, qs2, topk=100, query_k=10))
    report(results, "diffuse_precomputed_ms_per_query", round(1000 * t / len(q), 3))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", type=int, default=5000, help="synthetic gallery vectors")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--white-dim", type=int, default=128, help="whitening output dimension")
    p.add_argument("--graph-k", type=int, default=30, help="neighbours per node in the graph")
    p.add_argument("--queries", type=int, default=200, help="queries for the diffusion timings")
    p.add_argument("--truncate", type=int, default=1000,
                   help="m: each query's subgraph size for the truncated online form")
    p.add_argument("--offline-rows", type=int, default=5000,
                   help="gallery size for the offline precompute (it grows ~quadratically)")
    p.add_argument("--batch", type=int, default=64, help="pooling/AP batch (P x 4)")
    p.add_argument("--channels", type=int, default=2048, help="feature-map channels")
    p.add_argument("--threads", type=int, default=2, help="torch / faiss threads")
    p.add_argument("--skip", nargs="*", default=[], choices=["pooling", "whitening", "diffusion"])
    args = p.parse_args(argv)
    results = {"machine": platform.machine(), "args": vars(args)}
    print(json.dumps(results), flush=True)
    rng = np.random.default_rng(0)
    x, _ = clustered(rng, args.gallery, args.dim)
    if "pooling" not in args.skip:
        bench_pooling(args, results)
    if "whitening" not in args.skip:
        bench_whitening(args, results, x)
    if "diffusion" not in args.skip:
        bench_diffusion(args, results, x)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
