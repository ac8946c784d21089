"""Answer a batch of query embeddings against a published index; write the query-results contract.

    python pipelines/query.py --index indexes/market --queries query.parquet --k 100 --out results/

Reads the queries in batches (embeddings Parquet: query_id = image_id), searches every shard
(threads in this process, or one Ray actor per shard with --ray), merges the per-shard top-k and
writes OUT/part-NNNNN.parquet (query_id, rank, item_id, image_id, score) atomically.

Re-ranking (--rerank kreciprocal|aqe|alpha-qe|dba, comma-combinable) works from the index's own
neighbour lists (index.rerank.chain with IndexBackend): the sharded index is the search function for the queries'
and the gallery's neighbours, and the gallery vectors needed for distances and means are the
index version's source vectors (manifest "source", or --gallery-vectors), checked id by id
against the index. All queries are re-ranked together (k-reciprocal compares queries with each
other); scores are then the negated k-reciprocal distance, or the cosine of the expanded vectors.
Junk gallery items ("-1") take no part in re-ranking.

    python pipelines/query.py --index indexes/market --queries emb/ --split query \\
        --rerank dba,alpha-qe,kreciprocal --k 100 --out results/
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

from dataclasses import replace

from cluster.errors import actor_init_error, is_lost_on_ray
from pipelines._cli import add_ray_arguments, init_ray, make_parser, run_main
from pipelines._rerank import add_rerank_arguments, rerank_config


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--index", required=True, help="ROOT/NAME (the version CURRENT names) or a version dir")
    p.add_argument("--queries", required=True, help="query embeddings Parquet file or directory")
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--out", required=True, help="results directory (replaced atomically)")
    p.add_argument("--batch-size", type=int, default=4096, help="queries per search batch (default 4096)")
    p.add_argument("--verify", action="store_true", help="check every index file's sha256 before loading")
    p.add_argument("--ray", action="store_true", help="search with one Ray actor per shard")
    p.add_argument("--split", default=None, help="keep only query rows of this split (e.g. query)")
    add_rerank_arguments(p)
    p.add_argument("--gallery-vectors", default=None,
                   help="with --rerank: the vectors the index was built from (default: the source "
                        "recorded in the index manifest)")
    add_ray_arguments(p)
    return p.parse_args(argv)


def query_batches(index, queries_path: str, batch_size: int, split: str | None = None):
    """Yield (query_ids, query vectors (n, D) float32, model) per batch of at most `batch_size`
    queries (rows of `split` only when given), streamed: memory follows the batch, not the file.
    Checked first: an embeddings file of the index's model and dimension, image_ids unique."""
    import numpy as np
    import pyarrow as pa

    from contracts.vectors import (
        VectorFileError,
        check_unique_file,
        iter_vector_batches,
        open_dataset,
        read_metadata,
    )

    ds = open_dataset(queries_path)
    if "image_id" not in ds.schema.names:
        raise VectorFileError(f"{queries_path}: queries must be an embeddings file (image_id is the query_id)")
    meta = read_metadata(ds.schema, queries_path)
    index.check_model(meta.model)
    if meta.dim != index.query_dim(meta.model):
        raise VectorFileError(f"{queries_path}: query dimension {meta.dim} does not match index "
                              f"dimension {index.query_dim(meta.model)}")
    if split is not None and "split" not in ds.schema.names:
        raise VectorFileError(f"{queries_path}: --split given but the queries have no split column")
    check_unique_file(queries_path, "embeddings")  # a query_id answered twice is not one query
    cols = ["image_id"] + (["split"] if split is not None else [])
    for labels, vecs in iter_vector_batches(queries_path, batch_size, columns=cols):
        if split is not None:
            keep = np.asarray(labels.column("split").to_pylist(), dtype=object) == split
            if not keep.any():
                continue
            labels, vecs = labels.filter(pa.array(keep)), vecs[keep]
        qids = labels.column("image_id")
        if qids.null_count:
            raise VectorFileError(f"{queries_path}: image_id has null values")
        yield qids.to_pylist(), vecs, meta.model


def search_batches(index, queries_path: str, k: int, batch_size: int, split: str | None = None):
    """Yield (query_ids, query vectors (n, D) float32, SearchHits) per batch of queries."""
    for qids, vecs, model in query_batches(index, queries_path, batch_size, split):
        yield qids, vecs, index.search(vecs, k, model=model)


def _no_queries(args) -> ValueError:
    return ValueError(f"{args.queries}: no queries to answer (the file has no rows"
                      + (f" of split {args.split!r})" if args.split else ")"))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return answer(args)
    except Exception as e:
        why = actor_init_error(e) if args.ray else None
        if why:  # a shard actor could not open its shard on its node
            raise RuntimeError(f"a shard actor failed to start: {why}; no results written") from e
        if args.ray and is_lost_on_ray(e):  # one line, not Ray's traceback; nothing was published
            raise RuntimeError(f"a shard actor was lost mid-query ({type(e).__name__}: its node died?); "
                               f"no results written to {args.out}; re-run the query") from e
        raise


def answer(args) -> int:
    """Search (and re-rank) the queries of parsed `args`; writes args.out atomically."""
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    config = rerank_config(args.rerank, args, topk=args.k)
    from contracts.results import ResultsWriter, make_results_table
    from index.ann.search import open_index
    from index.rerank.chain import method_name, rerank_params

    if args.ray:
        init_ray(args.address, args.num_cpus)
    index = open_index(args.index, verify=args.verify, executor="ray" if args.ray else "local")
    meta = {"index": str(args.index), "version": index.version, "k": args.k,
            "mode": "instance" if index.has_images else "centroid", "rerank": method_name(config),
            "search_params": index.manifest.get("search_params", {})}
    if args.split is not None:
        meta["split"] = args.split
    if config.methods != ("none",):
        meta["rerank_params"] = rerank_params(config)
    print(f"index {args.index} version {index.version}: {len(index)} vectors in "
          f"{index.num_shards} shard(s), {index.manifest['index_type']}", flush=True)
    if args.k > len(index):  # no more answers than vectors; a larger k would only allocate padding
        print(f"note: --k {args.k} is more than the {len(index)} vectors of the index: "
              f"answering {len(index)} per query", flush=True)
        meta["k_requested"], meta["k"] = args.k, len(index)
        args.k = len(index)
        config = replace(config, topk=args.k)
    n = 0
    try:
        if config.methods != ("none",):
            return answer_reranked(index, args, config, meta)
        with ResultsWriter(args.out, meta) as w:
            for qids, _vecs, hits in search_batches(index, args.queries, args.k, args.batch_size, args.split):
                w.write(make_results_table(qids, hits.item_ids, hits.image_ids, hits.scores, hits.valid))
                n += len(qids)
                print(f"{n} queries", flush=True)
            if n == 0:
                raise _no_queries(args)
    finally:
        index.close()
    print(f"wrote {w.rows} rows for {n} queries to {args.out}")
    return 0


def answer_reranked(index, args, config, meta) -> int:
    """Search + re-rank. k-reciprocal compares the queries with each other (its union is queries
    and gallery), so it takes all queries at once; QE, DBA and diffusion treat each query on its
    own and stream the queries batch by batch (the gallery side is prepared once)."""
    import time

    import numpy as np

    from contracts.results import ResultsWriter, make_results_table
    from index.rerank.backends import load_index_vectors, result_scores
    from index.rerank.chain import (
        FlatBackend,
        IndexBackend,
        PreparedGallery,
        search_query_candidates,
    )

    t0 = time.perf_counter()
    batches = query_batches(index, args.queries, args.batch_size, args.split)
    if "kreciprocal" in config.methods:
        batches = _all_at_once(batches)
    first = next(batches, None)
    if first is None:
        raise _no_queries(args)
    items, _ = index.lookup(np.arange(len(index)))
    keep = items != "-1"
    print(f"re-ranking against {int(keep.sum())} gallery vectors ({len(index) - int(keep.sum())} junk "
          f"left out) with {meta['rerank']}", flush=True)

    def search(x, k):
        hits = index.search(x, k, labels=False)
        return hits.scores, hits.ids

    graph = stored_graph(index, config)
    backend, ahead = IndexBackend(search), None
    if graph is not None:
        meta["rerank_graph"] = graph.k
        if not {"aqe", "alpha-qe", "dba"} & set(config.methods):
            # with the graph, k-reciprocal searches the index only for the queries' candidates:
            # search them now and close the index, so that its memory (an HNSW shard holds its
            # own copy of the vectors) is free before the gallery's vectors are loaded
            qids, vecs, model = first
            first = qids, index.to_index_space(vecs, model), None
            ahead = search_query_candidates(first[1], search, config, keep)
            index.close()
            backend = FlatBackend()  # exact, for the rows whose graph lists junk shortened
    gallery = load_index_vectors(index, args.gallery_vectors)
    prepared = PreparedGallery(gallery, config, backend, keep, graph)
    del gallery  # the prepared gallery holds the rows it needs
    meta["score"] = "negated k-reciprocal distance" if "kreciprocal" in config.methods else \
        "negated diffusion distance" if "diffusion" in config.methods else "cosine of the expanded vectors"
    n = 0
    with ResultsWriter(args.out, meta) as w:
        for qids, vecs, model in _chain(first, batches):
            if ahead is not None:  # the one batch, already in the index's space
                result, ahead = prepared.rerank(vecs, ahead), None
            else:
                result = prepared.rerank(index.to_index_space(vecs, model))  # whitened if the index is
            scores = result_scores(result, config)
            r_items, r_images = index.lookup(result.ids)
            for s in range(0, len(qids), args.batch_size):  # parts of at most one batch
                e = min(s + args.batch_size, len(qids))
                w.write(make_results_table(qids[s:e], r_items[s:e], None if r_images is None else r_images[s:e],
                                           scores[s:e], result.ids[s:e] >= 0))
            n += len(qids)
            print(f"{n} queries", flush=True)
        meta["rerank_seconds"] = round(time.perf_counter() - t0, 3)
    print(f"wrote {w.rows} rows for {n} queries to {args.out} (re-ranked in {meta['rerank_seconds']:.1f}s)")
    return 0


def stored_graph(index, config):
    """The version's gallery neighbour graph (build_index.py --rerank-graph) when k-reciprocal
    can use it (no DBA, enough neighbours per row), else None; says which."""
    import os

    from index.rerank.graph import load_gallery_graph

    record = index.manifest.get("rerank_graph")
    if not record or "kreciprocal" not in config.methods:
        return None
    need = max(config.k1 + 1, config.k2)
    if "dba" in config.methods or record["k"] < min(need, len(index)):
        why = "DBA changes the vectors" if "dba" in config.methods else \
            f"it keeps {record['k']} neighbours per vector, k1 = {config.k1} needs {need}"
        print(f"note: not using the version's rerank graph ({why}): searching the gallery instead", flush=True)
        return None
    graph = load_gallery_graph(os.path.join(index.dir, record["file"]))
    if len(graph) != len(index):
        raise ValueError(f"{index.dir}: rerank graph has {len(graph)} rows, the index {len(index)}")
    print(f"using the version's rerank graph ({graph.k} neighbours per vector)", flush=True)
    return graph


def _all_at_once(batches):
    """The query batches joined into one (k-reciprocal's union holds every query)."""
    import numpy as np

    parts = list(batches)
    if parts:
        yield [q for p in parts for q in p[0]], np.concatenate([p[1] for p in parts]), parts[0][2]


def _chain(first, rest):
    yield first
    yield from rest


if __name__ == "__main__":
    run_main(main)
