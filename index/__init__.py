"""Vectors and ids: Parquet contracts, metrics, FAISS indexes, search and re-ranking.

Never imports `model`, `pipelines` or `cluster`.
"""


def open(path: str, verify: bool = False, **kwargs):
    """Open the version ROOT/NAME/CURRENT names for search: index.ann.search.open_index."""
    from index.ann.search import open_index  # lazy: `import index.evaluation.metrics` stays light

    return open_index(path, verify=verify, **kwargs)
