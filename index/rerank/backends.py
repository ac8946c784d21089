"""The index-backed side of re-ranking for query answering: the gallery vectors and the scores.

The chain itself is index.rerank.chain (run with `IndexBackend(search)`, the sharded index's
search, as the source of every neighbour list: junk filtered, DBA re-scored; see there).
The gallery vectors themselves (for distances, QE and DBA means) come from the index version's
source Parquet (`load_index_vectors`): the exact vectors the index was built from, read in the
build's row order, whose row numbers are the index's int64 ids. They are checked against the
index's ids tables (same count, same item_id / image_id per id), so a source that changed since
the build is refused rather than silently mismatched. FAISS reconstruction was not used: PQ
indexes only give approximations, ID-mapped flat shards cannot reconstruct by id, and shards
served by Ray actors live in other processes.
"""
from __future__ import annotations

import numpy as np

from index.rerank.chain import RerankConfig
from index.rerank.kreciprocal import RerankResult

__all__ = ["JUNK_ITEM", "load_index_vectors", "result_scores"]

JUNK_ITEM = "-1"


def result_scores(result: RerankResult, config: RerankConfig) -> np.ndarray:
    """(Q, k) float32 scores for the query-results contract (higher is more similar): the
    negated final distance with k-reciprocal, the diffusion score (0 = not reached) with
    diffusion, else the cosine of the expanded vectors."""
    if "kreciprocal" in config.methods or "diffusion" in config.methods:
        return (-result.distances).astype(np.float32)
    return (1.0 - result.distances / 2.0).astype(np.float32)


def load_index_vectors(index, path: str | None = None, batch_size: int | None = None) -> np.ndarray:
    """The vectors a sharded index was built from, as an (N, D) float32 array whose row i is
    the vector of index id i.

    index: an open `index.ann.search.ShardedIndex`; path: vectors Parquet (default: the version
    manifest's source); batch_size: rows read at a time (default: about 32 MB of vectors; the
    reader holds a few batches besides the result, 1.2 GB at 65,536 x 1280). Raises ValueError when the file does not match the index (model,
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
    batch_size = batch_size or max(1024, (32 << 20) // (4 * max(1, meta.dim)))
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
