"""The file contracts between stages (docs/design.md) and the atomic storage helpers.

manifest (one row per image), embeddings and centroids (vectors), query results, the embed
output layout (parts), the one row key (keys), and the write-to-a-temporary-name-then-rename
helpers every output goes through (storage). Both `model` and `index` import this package; it
imports neither.

The names below are attributes of the package, loaded on first use (PEP 562), so
``import contracts`` stays light (no pyarrow.dataset until a vector file is read)::

    import contracts
    table = contracts.read_vectors("out/emb")          # imports contracts.vectors now
"""
from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_HOMES = {
    "storage": ("resolve", "atomic_path", "atomic_dir", "replace_dir", "write_bytes_atomic",
                "write_text_atomic"),
    "keys": ("KEY_COLUMNS", "row_keys"),
    "vectors": ("VectorFileError", "VectorTable", "VectorMeta", "read_vectors", "iter_vector_batches",
                "open_dataset", "make_embeddings_table", "make_centroids_table", "embeddings_schema",
                "centroids_schema", "write_table_atomic", "l2_normalize", "check_vectors",
                "arrow_to_embeddings", "embeddings_to_arrow"),
    "results": ("ResultsFileError", "ResultsWriter", "RankedLists", "make_results_table", "read_results",
                "write_results", "read_ranked_lists"),
    "manifest": ("ManifestError", "MANIFEST_SCHEMA", "SPLITS", "make_manifest_table", "validate_manifest",
                 "read_manifest", "write_manifest"),
    "parts": ("EmbedOutput", "PartWriter", "DuplicateFilter", "previous_keys", "copy_carried",
              "write_errors"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}
SUBMODULES = tuple(_HOMES)

__all__ = [  # the names of _HOMES (tests/contracts/test_api.py checks)
    "KEY_COLUMNS",
    "MANIFEST_SCHEMA",
    "SPLITS",
    "DuplicateFilter",
    "EmbedOutput",
    "ManifestError",
    "PartWriter",
    "RankedLists",
    "ResultsFileError",
    "ResultsWriter",
    "VectorFileError",
    "VectorMeta",
    "VectorTable",
    "arrow_to_embeddings",
    "atomic_dir",
    "atomic_path",
    "centroids_schema",
    "check_vectors",
    "copy_carried",
    "embeddings_schema",
    "embeddings_to_arrow",
    "iter_vector_batches",
    "l2_normalize",
    "make_centroids_table",
    "make_embeddings_table",
    "make_manifest_table",
    "make_results_table",
    "open_dataset",
    "previous_keys",
    "read_manifest",
    "read_ranked_lists",
    "read_results",
    "read_vectors",
    "replace_dir",
    "resolve",
    "row_keys",
    "validate_manifest",
    "write_bytes_atomic",
    "write_errors",
    "write_manifest",
    "write_results",
    "write_table_atomic",
    "write_text_atomic",
]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # next access skips __getattr__
        return value
    if name in _HOMES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *SUBMODULES})
