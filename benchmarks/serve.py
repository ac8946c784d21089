"""The search service under load while a new index version is published.

Builds a gallery index (Market-1501-mini bounding_box_test images from ../shared/data, else
synthetic JPEGs) embedded by a random-weight resnet18 at 128x64 (the figures are the service's,
not a trained model's), starts serve.py's application on an embedded Ray on loopback, and runs
--clients concurrent clients for --requests requests in total (POST /search?k=10 with real
query images). Half-way through it builds and publishes a new version; every replica verifies
and swaps to it. Prints requests, failures, p50 / p99 latency, requests/s, and the versions seen.

    python benchmarks/serve.py --clients 8 --requests 2000 --replicas 2
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

MARKET = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "market1501_mini" / "Market-1501-v15.09.15"


def gallery_files(n: int, work: str) -> tuple[str, list[str], list[str]]:
    """(root, image ids, item ids) of n gallery images."""
    src = MARKET / "bounding_box_test"
    if src.is_dir():
        files = sorted(p for p in src.glob("*.jpg") if not p.name.startswith(("-1", "0000")))[:n]
        return str(src), [p.name for p in files], [p.name.split("_")[0] for p in files]
    import numpy as np
    from PIL import Image

    root = os.path.join(work, "images")
    os.makedirs(root, exist_ok=True)
    ids, items = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"{i // 4:04d}_{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(os.path.join(root, name))
        ids.append(name)
        items.append(f"{i // 4:04d}")
    return root, ids, items


def build(work: str, n: int) -> tuple[str, str, str, str]:
    """(index ROOT/NAME, embeddings file, model dir, images root)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from contracts.vectors import embeddings_schema
    from index.ann.build import BuildConfig, build_index
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.embedding import ModelRunner
    from model.net import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(128, 64))
    model_dir = os.path.join(work, "model")
    save_model(build_model(cfg).eval(), cfg, model_dir)
    root, ids, items = gallery_files(n, work)
    runner = ModelRunner(model_dir, device="cpu")
    vecs = []
    for s in range(0, len(ids), 64):
        res = runner.embed_images([pathlib.Path(root, i).read_bytes() for i in ids[s:s + 64]])
        vecs.append(res.embeddings)
    import numpy as np

    v = np.concatenate(vecs)
    emb = os.path.join(work, "emb.parquet")
    flat = pa.array(v.reshape(-1), pa.float32())
    pq.write_table(pa.table([pa.array(ids), pa.array(items), pa.array([1] * len(ids), pa.int32()),
                             pa.array(["gallery"] * len(ids)), pa.FixedSizeListArray.from_arrays(flat, v.shape[1])],
                            schema=embeddings_schema(v.shape[1], runner.model_id)), emb)
    build_index(emb, os.path.join(work, "indexes"), "bench", BuildConfig(index_type="flat"),
                progress=lambda m: None, model_dir=model_dir)
    return os.path.join(work, "indexes", "bench"), emb, model_dir, root


def post(url: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:  # connection refused / reset: a failed request
        return 0, str(e).encode()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--gallery", type=int, default=2000, help="gallery images (default 2000)")
    p.add_argument("--num-cpus", type=int, default=4, help="CPUs of the embedded Ray (default 4)")
    p.add_argument("--out", default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < args.clients:
        raise SystemExit("error: --clients >= 1 and --requests >= --clients")
    import numpy as np
    import ray
    from ray import serve

    from serving.app import start

    work = tempfile.mkdtemp(prefix="serve-bench-")
    t = time.perf_counter()
    index, emb, model_dir, root = build(work, args.gallery)
    print(f"gallery index of {args.gallery} images built in {time.perf_counter() - t:.1f}s ({root})", flush=True)
    qdir = MARKET / "query"
    queries = [p.read_bytes() for p in sorted(qdir.glob("*.jpg"))[:64]] if qdir.is_dir() else \
        [pathlib.Path(root, i).read_bytes() for i in sorted(os.listdir(root))[:64]]
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    try:
        start(index, "127.0.0.1", port, gallery_images=root, replicas=args.replicas, check_every=0.5,
              num_cpus=min(1.0, (args.num_cpus - 0.5) / args.replicas))
        for q in queries[:4]:  # warm-up
            post(f"{base}/search?k=10", q)
        latencies, failures, versions = [], [], {}
        lock = threading.Lock()
        counter = iter(range(args.requests))
        half = threading.Event()

        def client(c):
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if i == args.requests // 2:
                    half.set()
                t0 = time.perf_counter()
                status, body = post(f"{base}/search?k=10", queries[i % len(queries)])
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if status != 200:
                        failures.append((status, body[:200]))
                    else:
                        v = json.loads(body)["version"]
                        versions[v] = versions.get(v, 0) + 1

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        half.wait()
        from index.ann.build import BuildConfig, build_index

        tp = time.perf_counter()
        new = build_index(emb, os.path.dirname(index), "bench", BuildConfig(index_type="flat"),
                          progress=lambda m: None, model_dir=model_dir).version
        publish_at = tp - t0
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
    lat = np.array(latencies) * 1000
    figures = {"requests": len(latencies), "failed": len(failures), "clients": args.clients,
               "replicas": args.replicas, "gallery": args.gallery, "ray_cpus": args.num_cpus,
               "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
               "requests_per_s": round(len(latencies) / wall, 1), "seconds": round(wall, 1),
               "published_at_s": round(publish_at, 1), "new_version": new, "answers_by_version": versions}
    print(f"{figures['requests']} requests, {figures['failed']} failed, {args.clients} clients, "
          f"{args.replicas} replicas: p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
          f"{figures['requests_per_s']} requests/s; new version published at {figures['published_at_s']}s; "
          f"answers by version {versions}")
    for f in failures[:5]:
        print(f"failed: {f}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
