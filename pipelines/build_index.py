"""Build a sharded FAISS index version from embeddings/centroids Parquet and publish it.

    python pipelines/build_index.py --vectors centroids/ --root indexes --name market --shards 4

Writes ROOT/NAME/<version>/ (manifest.json, shard-NNN.faiss, shard-NNN.ids.parquet) under a
temporary name, renames it complete, then points ROOT/NAME/CURRENT at it (unless --no-publish).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import json

from pipelines._cli import make_parser, run_main


def parse_args(argv=None):
    from index.ann.build import BuildConfig

    d = BuildConfig()  # the defaults are the dataclass's
    p = make_parser(__doc__)
    p.add_argument("--vectors", required=True,
                   help="embeddings or centroids Parquet file or directory (local or pyarrow URI)")
    p.add_argument("--root", required=True, help="index root directory (local / mounted filesystem)")
    p.add_argument("--name", required=True, help="index name: versions live in ROOT/NAME/")
    p.add_argument("--shards", type=int, default=d.shards,
                   help=f"number of shards (by blake2b(item_id)); default {d.shards}")
    p.add_argument("--index-type", default=d.index_type,
                   help="auto (autofaiss-style choice), flat, hnsw, ivf, ivfpq, or a FAISS factory "
                        "string such as 'IVF4096,Flat' (default auto)")
    p.add_argument("--max-memory", type=float, default=d.max_memory_gb, metavar="GB",
                   help="memory budget in GiB for all shards' indexes; auto switches to OPQ+IVF+PQ "
                        "above it (default: no limit)")
    p.add_argument("--target-recall", type=float, default=d.target_recall,
                   help="recall@10 vs exact search that nprobe/efSearch are tuned to (default %(default)s)")
    p.add_argument("--eval-queries", type=int, default=d.eval_queries,
                   help="sampled vectors used as held-out queries for tuning (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="vectors read per batch (default %(default)s)")
    p.add_argument("--version", default=None, help="version name (default: UTC timestamp + random suffix)")
    p.add_argument("--no-publish", action="store_true", help="write the version but leave CURRENT alone")
    p.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                   help="GPU k-means training (auto: when faiss sees a GPU)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling / k-means seed (default %(default)s)")
    p.add_argument("--whiten", default=None, metavar="FILE.npz",
                   help="PCA-whitening fitted by pipelines/whiten.py: every vector is whitened and "
                        "re-normalised, the file is stored with the version, and query.py whitens "
                        "queries of the original model through it")
    p.add_argument("--whiten-dim", type=int, default=None,
                   help="with --whiten: keep only the leading DIM components (default: all)")
    p.add_argument("--rerank-graph", type=int, default=d.rerank_graph, metavar="K",
                   help="store every vector's K nearest neighbours with the version, so that query.py "
                        "--rerank kreciprocal merges the queries into them instead of searching the "
                        "whole gallery again (K >= k1 + 1; 32 covers the defaults; default 0: none)")
    p.add_argument("--model", default=None, metavar="MODEL_DIR",
                   help="the model directory the vectors were embedded with: recorded in the version's "
                        "manifest so search.py / serve.py embed queries with it (checked against the "
                        "vectors' model id)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from index.ann.build import BuildConfig, build_index

    if args.whiten_dim is not None and not args.whiten:
        raise ValueError("--whiten-dim needs --whiten FILE.npz")

    if args.model:
        check_model_dir(args.model, args.vectors)
    cfg = BuildConfig(shards=args.shards, index_type=args.index_type, max_memory_gb=args.max_memory,
                      target_recall=args.target_recall, eval_queries=args.eval_queries,
                      batch_size=args.batch_size, seed=args.seed,
                      whitening=args.whiten, whiten_dim=args.whiten_dim, rerank_graph=args.rerank_graph,
                      use_gpu={"auto": None, "yes": True, "no": False}[args.gpu])
    res = build_index(args.vectors, args.root, args.name, cfg, publish=not args.no_publish,
                      version=args.version, progress=lambda m: print(m, flush=True),
                      model_dir=args.model)
    m = res.manifest
    print(json.dumps({"version": res.version, "path": res.path, "published": res.published,
                      "index_type": m["index_type"], "num_vectors": m["num_vectors"],
                      "search_params": m["search_params"], "recall": m["recall"],
                      "seconds": round(res.seconds, 2)}))
    return 0


def check_model_dir(model_dir: str, vectors: str) -> None:
    """--model must be the model the vectors were embedded with (same id)."""
    from contracts.vectors import open_dataset, read_metadata
    from serving.engine import model_identity

    want = read_metadata(open_dataset(vectors).schema, vectors).model
    got = model_identity(model_dir)
    if got != want:
        raise ValueError(f"--model {model_dir} is model {got!r} but {vectors} was embedded with model {want!r}")


if __name__ == "__main__":
    run_main(main)
