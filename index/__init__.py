"""Vectors and ids: FAISS indexes, search, re-ranking, evaluation, centroids, nightly re-indexing.

The public API is `__all__`; each name is imported from its module on first use (PEP 562), so
`import index` stays light (no faiss, no torch). The chain that re-ranks is `rerank_chain`
(index.rerank.chain.rerank): the plain name `index.rerank.kreciprocal` is the re-ranking subpackage.

Never imports `model`, `pipelines` or `cluster`.
"""
from importlib import import_module

_HOMES = {
    "index.ann.search": ("open_index", "ShardedIndex"),
    "index.ann.build": ("build_index", "BuildConfig"),
    "index.ann.versions": ("IndexHome",),
    "index.rerank.chain": ("RerankConfig", "rerank_chain"),
    "index.rerank.expansion": ("query_expansion", "database_augmentation"),
    "index.rerank.diffusion": ("diffusion_rerank",),
    "index.rerank.kreciprocal": ("k_reciprocal_from_embeddings", "k_reciprocal_sparse"),
    "index.rerank.graph": ("GalleryGraph", "build_gallery_graph", "load_gallery_graph"),
    "index.evaluation.protocol": ("per_query_metrics", "make_report"),
    "index.evaluation.metrics": ("summarize",),
    "index.evaluation.run": ("evaluate_files",),
    "index.centroids.aggregate": ("Centroids", "PairSums", "partial_sums", "combine", "finalize"),
    "index.nightly.runner": ("Reindexer", "ReindexConfig"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}
_ALIASES = {"rerank_chain": "rerank"}  # exported name -> name in its module

__all__ = [
    "BuildConfig",
    "Centroids",
    "GalleryGraph",
    "IndexHome",
    "PairSums",
    "ReindexConfig",
    "Reindexer",
    "RerankConfig",
    "ShardedIndex",
    "build_gallery_graph",
    "build_index",
    "combine",
    "database_augmentation",
    "diffusion_rerank",
    "evaluate_files",
    "finalize",
    "k_reciprocal_from_embeddings",
    "k_reciprocal_sparse",
    "load_gallery_graph",
    "make_report",
    "open",
    "open_index",
    "partial_sums",
    "per_query_metrics",
    "query_expansion",
    "rerank_chain",
    "summarize",
]


def open(path: str, verify: bool = False, **kwargs):
    """Open the version ROOT/NAME/CURRENT names for search: index.ann.search.open_index."""
    from index.ann.search import open_index  # lazy: `import index` stays light

    return open_index(path, verify=verify, **kwargs)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'index' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), _ALIASES.get(name, name))
    globals()[name] = value  # once resolved, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
