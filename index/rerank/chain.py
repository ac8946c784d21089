"""The one re-ranking chain: DBA (gallery), then QE (queries), then k-reciprocal or diffusion.

Every step takes its neighbour lists from a search backend (index.rerank.neighbours):
- `FlatBackend` (default): exact flat inner-product searches over the arrays themselves, built
  again after DBA over the augmented vectors (evaluation, tests, small galleries);
- `IndexBackend(search)`: an existing search over the G gallery rows (the sharded FAISS index):
  junk is filtered out of its lists, and after DBA its candidates are re-scored with the
  augmented vectors (`rescored_search_fn`), so the chain scales with the index.

`PreparedGallery` does the gallery side once (junk, DBA, the diffusion graph on first use);
`PreparedGallery.expand(query)` is QE and `PreparedGallery.rerank(query)` the whole query side.
`rerank(...)` is both in one call. The query job, the evaluator and the index-backed path all
run this chain; the evaluator only adds its own whole-gallery scoring of the final stage.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from index.rerank import expansion
from index.rerank.diffusion import diffusion_rerank, knn_graph
from index.rerank.graph import GalleryGraph
from index.rerank.kreciprocal import RerankResult, k_reciprocal_sparse, query_candidate_count
from index.rerank.neighbours import (
    SearchFn,
    filtered_search_fn,
    flat_search_fn,
    rescored_search_fn,
    union_search_fn,
)

__all__ = ["METHODS", "FlatBackend", "IndexBackend", "PreparedGallery", "RerankConfig", "method_name", "rerank",
           "rerank_params", "search_query_candidates"]

METHODS = ("none", "kreciprocal", "aqe", "alpha-qe", "dba", "diffusion")
MAX_DISTANCE_NAMES = ("auto", "search", "sample")


@dataclass
class RerankConfig:
    """Re-ranking settings, checked on construction (ValueError naming the bad field).

    methods: any of "kreciprocal", "aqe", "alpha-qe", "dba", "diffusion" (or just "none"); they
    run in the order DBA (gallery), then QE (queries), then k-reciprocal or diffusion (one of
    the two: both re-rank the final lists).
    diffusion_*: index.rerank.diffusion.diffusion_rerank (graph k, alpha, gamma, query_k, truncate).
    qe_n / dba_n: neighbours averaged; alpha: exponent of alpha-QE (and of DBA's weights when
    dba_alpha is set); topk: results per query; candidates / max_distance ("auto", "search",
    "sample" or a number > 0, also given as text): see k_reciprocal_sparse."""

    methods: tuple[str, ...] = ("none",)
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    qe_n: int = 5
    alpha: float = 3.0
    dba_n: int = 5
    dba_alpha: float = 0.0
    topk: int = 100
    candidates: int | None = None
    max_distance: str | float = "auto"
    diffusion_k: int = 20
    diffusion_alpha: float = 0.99
    diffusion_gamma: float = 3.0
    diffusion_query_k: int = 10
    diffusion_truncate: int = 1000

    def __post_init__(self):
        if isinstance(self.methods, str):  # "dba,aqe": the CLI's form
            self.methods = RerankConfig.parse_methods(self.methods)
        self.methods = _check_methods(tuple(self.methods))
        if self.k1 < 1 or self.k2 < 1:
            raise ValueError(f"k1 and k2 must be >= 1, got {self.k1}, {self.k2}")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise ValueError(f"lambda_value must be in [0, 1], got {self.lambda_value}")
        if self.qe_n < 0 or self.dba_n < 0:
            raise ValueError(f"qe_n and dba_n must be >= 0, got {self.qe_n}, {self.dba_n}")
        if self.alpha < 0 or self.dba_alpha < 0:
            raise ValueError(f"alpha and dba_alpha must be >= 0, got {self.alpha}, {self.dba_alpha}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.candidates is not None and self.candidates < 1:
            raise ValueError(f"candidates must be >= 1 or None, got {self.candidates}")
        if self.diffusion_k < 1 or self.diffusion_query_k < 1 or self.diffusion_truncate < 1:
            raise ValueError("diffusion_k, diffusion_query_k and diffusion_truncate must be >= 1, got "
                             f"{self.diffusion_k}, {self.diffusion_query_k}, {self.diffusion_truncate}")
        if not 0.0 <= self.diffusion_alpha < 1.0:
            raise ValueError(f"diffusion_alpha must be in [0, 1), got {self.diffusion_alpha}")
        if not self.diffusion_gamma > 0:
            raise ValueError(f"diffusion_gamma must be > 0, got {self.diffusion_gamma}")
        self.max_distance = _check_max_distance(self.max_distance)

    @staticmethod
    def parse_methods(text: str) -> tuple[str, ...]:
        """"kreciprocal,alpha-qe" -> ("kreciprocal", "alpha-qe"); unknown names raise ValueError."""
        return _check_methods(tuple(m.strip().lower() for m in text.split(",") if m.strip()) or ("none",))

    def as_dict(self) -> dict:
        """The settings that a report should record."""
        return asdict(self)


def _check_methods(names: tuple[str, ...]) -> tuple[str, ...]:
    if not names:
        raise ValueError("methods is empty: use ('none',) for no re-ranking")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown re-ranking method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    if "aqe" in names and "alpha-qe" in names:
        raise ValueError("choose one of aqe and alpha-qe")
    if "kreciprocal" in names and "diffusion" in names:
        raise ValueError("choose one of kreciprocal and diffusion (both re-rank the final lists)")
    if "none" in names and len(names) > 1:
        raise ValueError("'none' cannot be combined with other re-ranking methods")
    return names


def _check_max_distance(value) -> str | float:
    if value in MAX_DISTANCE_NAMES:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_distance must be auto, search, sample or a number, got {value!r}") from None
    if not number > 0:
        raise ValueError(f"max_distance must be > 0, got {value}")
    return number


def method_name(config) -> str | None:
    """The report's "rerank" value: the methods joined by ",", or None for none."""
    return None if config.methods == ("none",) else ",".join(config.methods)


def rerank_params(config) -> dict:
    """The parameters that matter for the chosen methods (what a report records)."""
    m = set(config.methods)
    out = {}
    if "kreciprocal" in m:
        out.update(k1=config.k1, k2=config.k2, lambda_value=config.lambda_value,
                   max_distance=config.max_distance)
    if "aqe" in m or "alpha-qe" in m:
        out["qe_n"] = config.qe_n
    if "alpha-qe" in m:
        out["alpha"] = config.alpha
    if "dba" in m:
        out.update(dba_n=config.dba_n, dba_alpha=config.dba_alpha)
    if "diffusion" in m:
        out.update(diffusion_k=config.diffusion_k, diffusion_alpha=config.diffusion_alpha,
                   diffusion_gamma=config.diffusion_gamma, diffusion_query_k=config.diffusion_query_k,
                   diffusion_truncate=config.diffusion_truncate)
    return out


# --------------------------------------------------------------------------------------------
# search backends
# --------------------------------------------------------------------------------------------
class FlatBackend:
    """Exact flat inner-product searches over the vectors the chain holds at each step."""

    def gallery(self, kept: np.ndarray, keep: np.ndarray | None) -> SearchFn:
        """Search over the kept gallery rows `kept` (K, D) float32 (keep: (G,) bool or None)."""
        return flat_search_fn(kept)

    def augmented(self, search: SearchFn, vectors: np.ndarray) -> SearchFn:
        """Search over the DBA-augmented kept rows `vectors` (K, D) float32."""
        return flat_search_fn(vectors)


class IndexBackend:
    """An existing search over the G gallery rows (e.g. the sharded index): junk filtered out of
    its lists; after DBA, its factor * k candidates re-scored with the augmented vectors."""

    def __init__(self, search: SearchFn, rescore_factor: int = 4):
        self.search, self.rescore_factor = search, rescore_factor

    def gallery(self, kept: np.ndarray, keep: np.ndarray | None) -> SearchFn:
        return self.search if keep is None else filtered_search_fn(self.search, keep)

    def augmented(self, search: SearchFn, vectors: np.ndarray) -> SearchFn:
        return rescored_search_fn(search, vectors, self.rescore_factor)


# --------------------------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------------------------
def _uses_qe(config: RerankConfig) -> bool:
    return "aqe" in config.methods or "alpha-qe" in config.methods


class PreparedGallery:
    """The gallery side of re-ranking, done once: junk left out, DBA applied, the search over the
    result, the diffusion graph built on first use. `rerank(query)` then answers any number of
    query batches: QE and diffusion treat each query on its own; k-reciprocal's union is the
    batch given.

    gallery: (G, D) float32 L2-normalised; backend: FlatBackend() (default) or IndexBackend;
    gallery_keep: (G,) bool, False for rows that take no part (junk). neighbour_graph: the G
    rows' stored GalleryGraph (index.rerank.graph), used by k-reciprocal without DBA.
    Attributes: rows (K,) int64 kept gallery rows, vectors (K, D) float32 (augmented by DBA),
    search over those K rows, config with topk capped at K."""

    def __init__(self, gallery: np.ndarray, config: RerankConfig, backend=None,
                 gallery_keep: np.ndarray | None = None, neighbour_graph: GalleryGraph | None = None):
        backend = FlatBackend() if backend is None else backend
        keep = None if gallery_keep is None else np.asarray(gallery_keep, bool)
        if keep is not None and keep.shape != (len(gallery),):
            raise ValueError(f"gallery_keep has shape {keep.shape}, expected ({len(gallery)},)")
        if keep is not None and keep.all():
            keep = None
        rows = np.arange(len(gallery)) if keep is None else np.flatnonzero(keep)
        g = np.ascontiguousarray(gallery if keep is None else gallery[rows], np.float32)
        if len(g) == 0:
            raise ValueError("gallery is empty after removing junk items")
        # lists of min(topk, G): a larger topk would only allocate padding (k=10^7 on 146 vectors)
        config = replace(config, topk=min(config.topk, len(g)))
        search = backend.gallery(g, keep)
        if "dba" in config.methods:
            g = expansion.database_augmentation(g, config.dba_n, alpha=config.dba_alpha, search_fn=search)
            search = backend.augmented(search, g)
        self.config, self.rows, self.vectors, self.search = config, rows, g, search
        self._graph = None
        # the stored gallery graph holds the original vectors' neighbours: DBA changes them
        self.neighbour_graph = None
        if neighbour_graph is not None and "kreciprocal" in config.methods and "dba" not in config.methods:
            if len(neighbour_graph) != len(gallery):
                raise ValueError(f"neighbour graph has {len(neighbour_graph)} rows, the gallery {len(gallery)}")
            self.neighbour_graph = neighbour_graph if keep is None else neighbour_graph.restrict(rows)

    @property
    def graph(self):
        """The diffusion kNN graph of the (augmented) gallery (index.rerank.diffusion.Graph)."""
        if self._graph is None:
            self._graph = knn_graph(self.vectors, self.search, self.config.diffusion_k,
                                    self.config.diffusion_gamma)
        return self._graph

    def expand(self, query: np.ndarray) -> np.ndarray:
        """QE step: (Q, D) float32 queries, expanded when the config asks for AQE / alpha-QE."""
        q = np.ascontiguousarray(query, np.float32)
        if not _uses_qe(self.config):
            return q
        alpha = self.config.alpha if "alpha-qe" in self.config.methods else 0.0
        return expansion.query_expansion(q, self.vectors, self.config.qe_n, alpha=alpha, search_fn=self.search)

    def rank_kept(self, q: np.ndarray, query_candidates=None) -> RerankResult:
        """Final stage for already expanded queries q (Q, D): ids are KEPT rows (0..K-1, -1
        padding), (Q, topk) arrays; k-reciprocal, diffusion (distance = -score) or 2 - 2 cos.
        query_candidates: k-reciprocal's gallery search of q done ahead (search_query_candidates)."""
        config, g, search = self.config, self.vectors, self.search
        if query_candidates is not None and ("kreciprocal" not in config.methods or _uses_qe(config)):
            raise ValueError("query_candidates serve k-reciprocal without query expansion only")
        if "kreciprocal" in config.methods:
            return k_reciprocal_sparse(q, g, config.k1, config.k2, config.lambda_value, topk=config.topk,
                                       candidates=config.candidates, max_distance=config.max_distance,
                                       search_fn=union_search_fn(q, search), gallery_search_fn=search,
                                       neighbour_graph=self.neighbour_graph,
                                       query_candidates=query_candidates)
        if "diffusion" in config.methods:
            scores, ids = diffusion_rerank(q, g, search, config.topk, config.diffusion_k,
                                           config.diffusion_alpha, config.diffusion_gamma,
                                           config.diffusion_query_k, config.diffusion_truncate,
                                           graph=self.graph)
            dist = np.where(ids >= 0, -scores, np.inf).astype(np.float32)
        else:
            scores, ids = search(q, config.topk)
            ids = np.asarray(ids, np.int64)
            dist = np.where(ids >= 0, 2.0 - 2.0 * np.asarray(scores, np.float32), np.inf).astype(np.float32)
        pad = config.topk - ids.shape[1]
        if pad > 0:
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
        return RerankResult(ids, dist, np.ones(len(q), bool))

    def rerank(self, query: np.ndarray, query_candidates=None) -> RerankResult:
        """RerankResult for query (Q, D) float32: ids = gallery rows as given, (Q, min(topk, K)).
        query_candidates: from search_query_candidates (k-reciprocal without QE), so that the
        search that produced them need not be open any more."""
        res = self.rank_kept(self.expand(query), query_candidates)
        res.ids = np.where(res.ids >= 0, self.rows[np.maximum(res.ids, 0)], -1)
        return res


def search_query_candidates(query: np.ndarray, search: SearchFn, config: RerankConfig,
                            gallery_keep: np.ndarray, graph: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal's first step, the queries' gallery search, done before the gallery side is
    prepared: a caller can close the index (and free its memory) before loading the gallery's
    vectors. query: (Q, D) float32 (not expanded: no QE); search: over all G gallery rows;
    gallery_keep: (G,) bool, False for junk; graph: a neighbour graph will be used. Returns
    (scores (Q, C) float32, ids (Q, C) int64 kept rows, -1 padding) for PreparedGallery.rerank."""
    if "kreciprocal" not in config.methods or _uses_qe(config):
        raise ValueError("query candidates are searched ahead for k-reciprocal without query expansion only")
    keep = np.asarray(gallery_keep, bool)
    n_keep = int(keep.sum())
    if n_keep == 0:
        raise ValueError("gallery is empty after removing junk items")
    topk = min(config.topk, n_keep)  # as PreparedGallery caps it
    c = query_candidate_count(config.k1, config.k2, topk, config.candidates, len(query), n_keep, graph)
    kept_search = search if keep.all() else filtered_search_fn(search, keep)
    q = np.ascontiguousarray(query, np.float32)
    scores = np.full((len(q), c), -np.inf, np.float32)
    ids = np.full((len(q), c), -1, np.int64)
    for lo in range(0, len(q), 65536):
        sc, i = kept_search(q[lo:lo + 65536], c)
        i = np.asarray(i, np.int64)[:, :c]
        ids[lo:lo + len(i), :i.shape[1]] = i
        scores[lo:lo + len(i), :i.shape[1]] = np.asarray(sc, np.float32)[:, :c]
    return scores, ids


def rerank(query: np.ndarray, gallery: np.ndarray, config: RerankConfig,
           gallery_keep: np.ndarray | None = None, search: SearchFn | None = None,
           rescore_factor: int = 4) -> RerankResult:
    """Re-rank query (Q, D) against gallery (G, D) float32 (L2-normalised) by `config`.

    search: None for exact flat searches over the arrays (FlatBackend), or a search over the G
    gallery rows (e.g. the sharded index; IndexBackend with `rescore_factor`) as the source of
    every neighbour list. gallery_keep: (G,) bool, False for junk. Returns RerankResult with
    ids = gallery rows (-1 padding), (Q, min(topk, kept G)) arrays, every list filled; the
    distances are k-reciprocal final distances, negated diffusion scores, or 2 - 2 cos of the
    (expanded / augmented) vectors; `certified` all True except where k-reciprocal says so."""
    backend = FlatBackend() if search is None else IndexBackend(search, rescore_factor)
    return PreparedGallery(gallery, config, backend, gallery_keep).rerank(query)
