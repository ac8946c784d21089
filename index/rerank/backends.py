"""Re-ranking on top of an existing gallery search (the sharded FAISS index), for query answering.

`index.rerank.kreciprocal.rerank` builds its own exact searches over the vectors it is given. Query
answering already has a search over the gallery: the published index. `rerank_with_search`
runs the same steps (DBA, then QE, then k-reciprocal; index/rerank.py) with that search as the
source of every neighbour list, so it scales with the index:

- junk (item "-1") takes no part: `filtered_search_fn` drops it from the index's lists (asking
  the index for more neighbours where the filter leaves a list short);
- after DBA the gallery vectors differ from the indexed ones: `rescored_search_fn` takes the
  index's candidates (factor x k, found with the original vectors) and re-scores them with the
  augmented vectors. Exact when the augmented top-k lies within the original top factor*k,
  which holds in practice since DBA moves a vector towards its own neighbours;
- k-reciprocal uses `union_search_fn` (queries searched exactly, gallery through the index).

The gallery vectors themselves (for distances, QE and DBA means) come from the index version's
source Parquet (`load_index_vectors`): the exact vectors the index was built from, read in the
build's row order, whose row numbers are the index's int64 ids. They are checked against the
index's ids tables (same count, same item_id / image_id per id), so a source that changed since
the build is refused rather than silently mismatched. FAISS reconstruction was not used: PQ
indexes only give approximations, ID-mapped flat shards cannot reconstruct by id, and shards
served by Ray actors live in other processes.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from index.rerank import expansion
from index.rerank.kreciprocal import RerankConfig, RerankResult, k_reciprocal_sparse
from index.rerank.neighbours import SearchFn, filtered_search_fn, rescored_search_fn, union_search_fn

JUNK_ITEM = "-1"


class PreparedGallery:
    """The gallery side of re-ranking, done once: junk filtered out of the search, DBA applied
    (then the index's lists re-scored with the augmented vectors), the diffusion graph built on
    first use. `rerank(query)` then answers any number of query batches: QE, k-reciprocal and
    diffusion treat each query on its own except k-reciprocal, whose union is the batch given.

    gallery: (G, D) float32 L2-normalised; gallery_search over those G rows (e.g. the sharded
    index); gallery_keep: (G,) bool, False for rows that take no part (junk)."""

    def __init__(self, gallery: np.ndarray, config: RerankConfig, gallery_search: SearchFn,
                 gallery_keep: np.ndarray | None = None, rescore_factor: int = 4):
        keep = None if gallery_keep is None else np.asarray(gallery_keep, bool)
        if keep is not None and keep.shape != (len(gallery),):
            raise ValueError(f"gallery_keep has shape {keep.shape}, expected ({len(gallery)},)")
        if keep is not None and keep.all():
            keep = None
        if keep is None:
            rows, g, search = np.arange(len(gallery)), np.asarray(gallery, np.float32), gallery_search
        else:
            rows = np.flatnonzero(keep)
            g = np.ascontiguousarray(gallery[rows], np.float32)
            search = filtered_search_fn(gallery_search, keep)
        if len(g) == 0:
            raise ValueError("gallery is empty after removing junk items")
        # lists of min(topk, G): a larger topk would only allocate padding (k=10^7 on 146 vectors)
        config = replace(config, topk=min(config.topk, len(g)))
        if "dba" in config.methods:
            g = expansion.database_augmentation(g, config.dba_n, alpha=config.dba_alpha, search_fn=search)
            search = rescored_search_fn(search, g, rescore_factor)
        self.config, self.rows, self.g, self.search = config, rows, g, search
        self.graph = None

    def rerank(self, query: np.ndarray) -> RerankResult:
        """RerankResult for query (Q, D) float32: ids = gallery rows, (Q, min(topk, kept G))."""
        config, g, search, rows = self.config, self.g, self.search, self.rows
        methods = set(config.methods)
        q = np.ascontiguousarray(query, np.float32)
        if "aqe" in methods or "alpha-qe" in methods:
            alpha = config.alpha if "alpha-qe" in methods else 0.0
            q = expansion.query_expansion(q, g, config.qe_n, alpha=alpha, search_fn=search)
        if "kreciprocal" in methods:
            res = k_reciprocal_sparse(q, g, config.k1, config.k2, config.lambda_value, topk=config.topk,
                                      candidates=config.candidates, max_distance=config.max_distance,
                                      search_fn=union_search_fn(q, search), gallery_search_fn=search)
            res.ids = np.where(res.ids >= 0, rows[np.maximum(res.ids, 0)], -1)
            return res
        if "diffusion" in methods:
            from index.rerank.diffusion import diffusion_rerank, knn_graph

            if self.graph is None:
                self.graph = knn_graph(g, search, config.diffusion_k, config.diffusion_gamma)
            scores, ids = diffusion_rerank(q, g, search, config.topk, config.diffusion_k,
                                           config.diffusion_alpha, config.diffusion_gamma,
                                           config.diffusion_query_k, config.diffusion_truncate,
                                           graph=self.graph)
            dist = np.where(ids >= 0, -scores, np.inf).astype(np.float32)  # distance = -diffusion score
        else:
            scores, ids = search(q, config.topk)
            ids = np.asarray(ids, np.int64)
            dist = np.where(ids >= 0, 2.0 - 2.0 * np.asarray(scores, np.float32), np.inf).astype(np.float32)
        pad = config.topk - ids.shape[1]
        if pad > 0:
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
        return RerankResult(np.where(ids >= 0, rows[np.maximum(ids, 0)], -1), dist, np.ones(len(q), bool))


def rerank_with_search(query: np.ndarray, gallery: np.ndarray, config: RerankConfig,
                       gallery_search: SearchFn, gallery_keep: np.ndarray | None = None,
                       rescore_factor: int = 4) -> RerankResult:
    """Re-rank query (Q, D) against gallery (G, D) float32 (L2-normalised) by `config`, taking
    neighbour lists from `gallery_search` (over the G gallery rows, e.g. the sharded index).

    gallery_keep: (G,) bool, False for rows that take no part (junk). Returns RerankResult with
    ids = gallery rows (-1 padding) and distances: k-reciprocal final distances, or 2 - 2 cos
    of the (expanded / augmented) vectors without k-reciprocal. (Q, min(config.topk, kept G))
    arrays: every query gets that many results, however many more queries than gallery rows."""
    return PreparedGallery(gallery, config, gallery_search, gallery_keep, rescore_factor).rerank(query)


def result_scores(result: RerankResult, config: RerankConfig) -> np.ndarray:
    """(Q, k) float32 scores for the query-results contract (higher is more similar): the
    negated final distance with k-reciprocal, the diffusion score (0 = not reached) with
    diffusion, else the cosine of the expanded vectors."""
    if "kreciprocal" in config.methods or "diffusion" in config.methods:
        return (-result.distances).astype(np.float32)
    return (1.0 - result.distances / 2.0).astype(np.float32)


def load_index_vectors(index, path: str | None = None, batch_size: int = 65536) -> np.ndarray:
    """The vectors a sharded index was built from, as an (N, D) float32 array whose row i is
    the vector of index id i.

    index: an open `index.ann.search.ShardedIndex`; path: vectors Parquet (default: the version
    manifest's source). Raises ValueError when the file does not match the index (model,
    dimension, row count, or the item_id / image_id of any id)."""
    from contracts.vectors import (
        VectorFileError,
        check_schema,
        detect_kind,
        iter_vector_batches,
        open_dataset,
    )

    sources = index.manifest.get("source") or []
    path = path or (sources[0] if sources else None)
    if not path:
        raise VectorFileError(f"index {index.path} records no source vectors: pass the gallery vectors")
    try:
        ds = open_dataset(path)
    except (OSError, ValueError) as e:
        raise VectorFileError(f"re-ranking needs the index's vectors, cannot open {path}: "
                              f"{str(e).splitlines()[0]}") from None
    meta = check_schema(ds.schema, detect_kind(ds.schema), path)
    # a whitened index was built from raw vectors of its input model, whitened on the way in
    whitening = getattr(index, "whitening", None)
    want_model, want_dim = index.input_model, index.query_dim(index.input_model)
    if meta.dim != want_dim or str(meta.model) != want_model:
        raise VectorFileError(f"{path}: vectors (model {meta.model!r}, dim {meta.dim}) do not match "
                              f"index {index.path} (model {want_model!r}, dim {want_dim})")
    n = len(index)
    if ds.count_rows() != n:
        raise VectorFileError(f"{path}: {ds.count_rows()} rows but index {index.path} version "
                              f"{index.version} holds {n} vectors (the source changed since the build)")
    has_image = "image_id" in ds.schema.names and index.has_images
    cols = ["item_id"] + (["image_id"] if has_image else [])
    out = np.empty((n, index.dim), np.float32)
    offset = 0
    for labels, vecs in iter_vector_batches(path, batch_size, columns=cols):
        ids = np.arange(offset, offset + len(vecs))
        items, images = index.lookup(ids)
        same = np.array_equal(np.asarray(labels.column("item_id").to_pylist(), object), items)
        if has_image:
            same &= np.array_equal(np.asarray(labels.column("image_id").to_pylist(), object), images)
        if not same:
            raise VectorFileError(f"{path}: rows {offset}..{offset + len(vecs) - 1} do not match the "
                                  f"index's ids tables (the source changed since the build)")
        out[offset:offset + len(vecs)] = whitening.apply(vecs) if whitening is not None else vecs
        offset += len(vecs)
    return out
