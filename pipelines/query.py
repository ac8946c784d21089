"""Answer a batch of query embeddings against a published index; write the query-results contract.

    python pipelines/query.py --index indexes/market --queries query.parquet --k 100 --out results/

Reads the queries in batches (embeddings Parquet: query_id = image_id), searches every shard
(threads in this process, or one Ray actor per shard with --ray), merges the per-shard top-k and
writes OUT/part-NNNNN.parquet (query_id, rank, item_id, image_id, score) atomically.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse

from pipelines._cli import add_ray_arguments, init_ray, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="ROOT/NAME (the version CURRENT names) or a version dir")
    p.add_argument("--queries", required=True, help="query embeddings Parquet file or directory")
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--out", required=True, help="results directory (replaced atomically)")
    p.add_argument("--batch-size", type=int, default=4096, help="queries per search batch (default 4096)")
    p.add_argument("--verify", action="store_true", help="check every index file's sha256 before loading")
    p.add_argument("--ray", action="store_true", help="search with one Ray actor per shard")
    add_ray_arguments(p)
    return p.parse_args(argv)


def search_batches(index, queries_path: str, k: int, batch_size: int):
    """Yield (query_ids, query vectors (n, D) float32, SearchHits) per batch of queries. The one place where a re-ranking step
    (--rerank) plugs in: it takes these hits (plus the query vectors) and returns new hits."""
    from index.vectors import VectorFileError, iter_vector_batches, open_dataset, read_metadata

    ds = open_dataset(queries_path)
    if "image_id" not in ds.schema.names:
        raise VectorFileError(f"{queries_path}: queries must be an embeddings file (image_id is the query_id)")
    meta = read_metadata(ds.schema, queries_path)
    if meta.dim != index.dim:
        raise VectorFileError(f"{queries_path}: query dimension {meta.dim} does not match index "
                              f"dimension {index.dim}")
    index.check_model(meta.model)
    for labels, vecs in iter_vector_batches(queries_path, batch_size, columns=["image_id"]):
        qids = labels.column("image_id")
        if qids.null_count:
            raise VectorFileError(f"{queries_path}: image_id has null values")
        yield qids.to_pylist(), vecs, index.search(vecs, k)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    from index.results import ResultsWriter, make_results_table
    from index.search import open_index

    if args.ray:
        init_ray(args.address, args.num_cpus)
    index = open_index(args.index, verify=args.verify, executor="ray" if args.ray else "local")
    meta = {"index": str(args.index), "version": index.version, "k": args.k,
            "mode": "instance" if index.has_images else "centroid", "rerank": None,
            "search_params": index.manifest.get("search_params", {})}
    print(f"index {args.index} version {index.version}: {len(index)} vectors in "
          f"{index.num_shards} shard(s), {index.manifest['index_type']}", flush=True)
    n = 0
    try:
        with ResultsWriter(args.out, meta) as w:
            for qids, _vecs, hits in search_batches(index, args.queries, args.k, args.batch_size):
                w.write(make_results_table(qids, hits.item_ids, hits.image_ids, hits.scores, hits.valid))
                n += len(qids)
                print(f"{n} queries", flush=True)
    finally:
        index.close()
    print(f"wrote {w.rows} rows for {n} queries to {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
