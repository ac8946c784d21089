"""Build a sharded FAISS index version from an embeddings or centroids Parquet (streamed).

Steps (`build_index`):
1. count rows (Parquet metadata) and choose the index type (`choose_index_type`, autofaiss'
   rules: Flat when small, HNSW or IVF-Flat (4*sqrt(n)..16*sqrt(n) lists) for medium sizes,
   OPQ+IVF+PQ when IVF-Flat would not fit ``max_memory_gb``);
2. pass 1 (approximate types only): a uniform random sample of vectors for training and a
   held-back sample of evaluation queries (bottom-k sampling on random keys, O(sample) memory);
3. train one template index on the sample (GPU k-means when faiss sees GPUs) and clone it per
   shard, so all shards share one coarse quantizer;
4. pass 2: stream batches, assign each vector to shard ``blake2b(item_id) % S`` (stable across
   runs and machines; all images of an item land in one shard), add them with int64 ids (the
   global row number) and write the id -> item_id/image_id tables as they come; the exact top-k
   of the evaluation queries is accumulated on the way (ground truth without a second read);
5. tune nprobe / efSearch to the smallest value reaching ``target_recall`` recall@10 against
   exact search, with the evaluation sample held back (not in the index while tuning, added
   right after), and record the achieved recall;
5b. optionally (``rerank_graph``) store every vector's own nearest neighbours for k-reciprocal
   re-ranking at query time (index.rerank.graph);
6. write ``shard-NNN.faiss`` + ``shard-NNN.ids.parquet`` + manifest (sha256 of every file) into a
   temporary directory, rename it to the version name, then (optionally) publish CURRENT.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.vectors import (
    VectorFileError,
    check_schema,
    check_unique_file,
    detect_kind,
    iter_vector_batches,
    open_dataset,
)
from index.ann.search import apply_search_params, exact_search, merge_topk
from index.ann.versions import IndexHome, finalize_manifest, shard_files
from index.rerank.backends import JUNK_ITEM
from index.rerank.graph import GRAPH_FILE, build_gallery_graph, save_gallery_graph
from index.rerank.kreciprocal import resolve_max_distance
from index.rerank.neighbours import filtered_search_fn

log = logging.getLogger(__name__)

METRIC = "inner_product"
IDS_SCHEMA = pa.schema([pa.field("id", pa.int64(), nullable=False),
                        pa.field("item_id", pa.string(), nullable=False),
                        pa.field("image_id", pa.string())])
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
               1536, 2048, 4096, 8192, 16384, 32768, 65536)
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)
PQ_CHOICES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # bytes per vector, best first (autofaiss)
ALIASES = ("auto", "flat", "hnsw", "ivf", "ivfpq")


class IndexBuildError(ValueError):
    """Bad build input or options (no vectors, unknown index type, impossible memory budget)."""


@dataclass(frozen=True)
class BuildConfig:
    """How to build. index_type: "auto", an alias (flat, hnsw, ivf, ivfpq) or a FAISS factory
    string (e.g. "IVF1024,Flat"; wrapped in IDMap when it cannot take ids itself)."""

    shards: int = 1
    index_type: str = "auto"
    max_memory_gb: float | None = None  # budget for all shards' index bytes; None = unlimited
    target_recall: float = 0.95  # recall@10 vs exact search that nprobe/efSearch are tuned to
    batch_size: int = 65536
    eval_queries: int = 1000
    recall_k: int = 10
    flat_threshold: int = 10_000  # per shard: below this Flat (exact) is fast enough
    hnsw_threshold: int = 100_000  # per shard: below this HNSW; above, IVF (mmap-able, builds fast)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    train_points_per_list: int = 64  # k-means sample size per inverted list (faiss wants >= 39)
    max_train_points: int = 500_000
    kmeans_iters: int = 12
    seed: int = 0
    use_gpu: bool | None = None  # None: when faiss.get_num_gpus() > 0
    whitening: str | None = None  # a fitted PCA-whitening .npz (pipelines/whiten.py) applied
    whiten_dim: int | None = None  # to every vector and stored with the version; None = its dim
    rerank_graph: int = 0  # neighbours per vector stored for k-reciprocal (index.rerank.graph); 0 = none

    def __post_init__(self):
        for name in ("shards", "batch_size", "eval_queries", "recall_k", "hnsw_m", "hnsw_ef_construction",
                     "train_points_per_list", "max_train_points", "kmeans_iters", "flat_threshold",
                     "hnsw_threshold"):
            if getattr(self, name) < 1:
                why = (": the recorded recall (and nprobe / efSearch) is measured on them"
                       if name == "eval_queries" else "")
                raise IndexBuildError(f"{name} must be >= 1, got {getattr(self, name)}{why}")
        if not 0 < self.target_recall <= 1:
            raise IndexBuildError(f"target recall must be in (0, 1], got {self.target_recall}")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise IndexBuildError(f"max_memory_gb must be > 0 or None, got {self.max_memory_gb}")
        if self.rerank_graph < 0:
            raise IndexBuildError(f"rerank_graph must be >= 0 (0 = no graph), got {self.rerank_graph}")
        if self.whiten_dim is not None and self.whiten_dim < 1:
            raise IndexBuildError(f"whiten_dim must be >= 1 or None, got {self.whiten_dim}")


@dataclass
class BuildResult:
    version: str
    path: str
    manifest: dict
    published: bool
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# choosing the index


def nlist_for(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest 4*sqrt(n), kept in
    [4*sqrt(n), 16*sqrt(n)] (faiss guidelines / autofaiss), and >= 1."""
    if n <= 0:
        return 1
    lo = 4 * math.sqrt(n)
    p = 2 ** round(math.log2(lo))
    if p < lo:
        p *= 2
    # never more lists than k-means can train well (39 points per centroid)
    return int(max(1, min(p, n // 39)))


def estimate_bytes(factory: str, n: int, dim: int) -> int:
    """Rough bytes of an index holding n vectors (codes + ids + coarse centroids)."""
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", factory)) else 0
    centroids = nlist * dim * 4
    if (m := re.search(r"PQ(\d+)", factory)) and "IVF" in factory:
        return n * (int(m.group(1)) + 8) + centroids + 256 * dim * 4 + dim * dim * 4
    if (m := re.search(r"HNSW(\d+)", factory)):
        return n * (dim * 4 + 2 * int(m.group(1)) * 4 + 8 + 8)  # vectors + level-0 links + ids
    return n * (dim * 4 + 8) + centroids


def choose_index_type(n_total: int, dim: int, shards: int, cfg: BuildConfig) -> str:
    """autofaiss-style choice of a per-shard FAISS factory string (IDMap added later)."""
    kind = cfg.index_type.lower() if cfg.index_type.lower() in ALIASES else None
    if kind is None:
        return cfg.index_type
    n = max(1, math.ceil(n_total / shards))  # vectors per shard (hash sharding is near-uniform)
    budget = None if cfg.max_memory_gb is None else cfg.max_memory_gb * 2**30
    nlist = nlist_for(n)
    ivf_flat = f"IVF{nlist},Flat"
    hnsw = f"HNSW{cfg.hnsw_m}"

    def fits(factory: str) -> bool:
        return budget is None or estimate_bytes(factory, n, dim) * shards <= budget

    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return hnsw
    if kind == "ivf":
        return ivf_flat
    if kind == "auto":
        if n < cfg.flat_threshold and fits("Flat"):
            return "Flat"
        if n < cfg.hnsw_threshold and fits(hnsw):
            return hnsw
        if fits(ivf_flat):
            return ivf_flat
    # ivfpq, or auto over budget: the largest PQ code that fits (autofaiss' OPQ+IVF+PQ); an
    # explicit "ivfpq" without a budget takes 64-byte codes (or the largest below that)
    options = [m for m in PQ_CHOICES if m < dim and dim % m == 0] or [m for m in PQ_CHOICES if m < dim]
    if kind == "ivfpq" and budget is None:
        options = [m for m in options if m <= 64] or options
    for m in options:
        # "np": no polysemous training (slow, and useless without a Hamming threshold at search)
        factory = f"OPQ{m}_{m * max(1, dim // m)},IVF{nlist},PQ{m}np"
        if fits(factory):
            return factory
    raise IndexBuildError(f"no index type fits {cfg.max_memory_gb} GiB for {n_total} x {dim} vectors "
                          f"in {shards} shard(s); raise --max-memory or add shards/machines")


def is_ivf(factory: str) -> bool:
    return bool(re.search(r"(^|,)(OPQ\d+(_\d+)?,)?(PCA\w*,)?IVF|IMI", factory))


def is_exact(factory: str) -> bool:
    return factory.replace("IDMap,", "").replace("IDMap2,", "") in ("Flat",)


def per_shard_factory(factory: str) -> str:
    """Factory string that accepts add_with_ids: IVF indexes do; others get an IDMap wrapper."""
    if is_ivf(factory) or factory.startswith("IDMap"):
        return factory
    return "IDMap," + factory


# ---------------------------------------------------------------------------------------------
# sharding and sampling


def shard_of(item_ids, shards: int) -> np.ndarray:
    """Stable shard number of each item_id: blake2b-64(item_id) mod shards -> (N,) int64.
    (Python's hash() is salted per process and would move items between builds.)"""
    if shards == 1:
        return np.zeros(len(item_ids), dtype=np.int64)
    out = np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") % shards
         for i in item_ids), dtype=np.int64, count=len(item_ids))
    return out


class BottomKSample:
    """Uniform sample of up to `size` rows from a stream: keep the rows with the smallest
    random keys (bottom-k sampling), O(size) memory."""

    def __init__(self, size: int, dim: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.keys = np.zeros(0)
        self.vecs = np.zeros((0, dim), np.float32)
        self.ids = np.zeros(0, np.int64)

    def add(self, vecs: np.ndarray, ids: np.ndarray) -> None:
        if self.size <= 0:
            return
        keys = np.concatenate([self.keys, self.rng.random(len(vecs))])
        allv = np.concatenate([self.vecs, vecs])
        alli = np.concatenate([self.ids, ids])
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keys, allv, alli = keys[keep], allv[keep], alli[keep]
        self.keys, self.vecs, self.ids = keys, allv, alli


# ---------------------------------------------------------------------------------------------
# recall


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k, each query's own id removed from both lists
    first. approx_ids / exact_ids: (Q, >= k+1) int64; self_ids: (Q,) int64."""
    hits = 0
    for a, e, s in zip(approx_ids, exact_ids, self_ids):
        a = [x for x in a if x != s and x >= 0][:k]
        e = [x for x in e if x != s and x >= 0][:k]
        hits += len(set(a) & set(e)) / max(1, len(e))
    return hits / max(1, len(self_ids))


def _search_all(indexes, queries: np.ndarray, k: int) -> np.ndarray:
    parts = []
    for idx in indexes:
        if idx.ntotal == 0:
            continue
        parts.append(idx.search(queries, k))
    return merge_topk(parts, k)[1]


def tune_search_params(indexes, factory: str, queries: np.ndarray, self_ids: np.ndarray,
                       exact_ids: np.ndarray, target: float, k: int = 10) -> tuple[dict, float]:
    """Smallest nprobe (IVF) / efSearch (HNSW) whose merged recall@k reaches `target`; if none
    does, the largest tried. Sets it on `indexes`; returns (params, achieved recall)."""
    if "HNSW" in factory and not is_ivf(factory):
        name, grid = "efSearch", EF_GRID
    elif is_ivf(factory):
        nlist = int(re.search(r"IVF(\d+)", factory).group(1))
        name, grid = "nprobe", tuple(v for v in NPROBE_GRID if v < nlist) + (nlist,)
    else:
        ids = _search_all(indexes, queries, k + 1)
        return {}, recall_at(ids, exact_ids, self_ids, k)
    tried: list[tuple[int, float]] = []
    for value in grid:
        for idx in indexes:
            apply_search_params(idx, {name: value})
        r = recall_at(_search_all(indexes, queries, k + 1), exact_ids, self_ids, k)
        log.info("tune %s=%s recall@%d=%.4f", name, value, k, r)
        tried.append((value, r))
        if r >= target:
            break
        # quantised codes (PQ) cap the recall: stop once two more steps gain < 0.002
        if len(tried) >= 3 and r - tried[-3][1] < 0.002:
            break
    if tried[-1][1] < target:  # target not reached: the smallest value within 0.002 of the best
        top = max(r for _, r in tried)
        value, r = next((v, r) for v, r in tried if r >= top - 0.002)
        tried.append((value, r))
    value, r = tried[-1]
    for idx in indexes:
        apply_search_params(idx, {name: value})
    return {name: value}, r


# ---------------------------------------------------------------------------------------------
# building


def _vector_source(path: str):
    ds = open_dataset(path)
    meta = check_schema(ds.schema, detect_kind(ds.schema), path)
    kind = detect_kind(ds.schema)
    return ds, meta, kind


def _gpu_enabled(cfg: BuildConfig) -> bool:
    import faiss

    n = faiss.get_num_gpus()
    if cfg.use_gpu and n <= 0:
        raise IndexBuildError("use_gpu requested but faiss sees no GPU (is faiss-gpu installed?)")
    return n > 0 if cfg.use_gpu is None else bool(cfg.use_gpu)


def train_template(factory: str, dim: int, sample: np.ndarray, cfg: BuildConfig, gpu: bool):
    """Create the per-shard index from `factory` (inner product) and train it on `sample`."""
    import faiss

    index = faiss.index_factory(dim, per_shard_factory(factory), faiss.METRIC_INNER_PRODUCT)
    if is_ivf(factory):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = cfg.kmeans_iters
        ivf.cp.seed = cfg.seed
        ivf.cp.max_points_per_centroid = max(cfg.train_points_per_list, 39)
        if gpu:  # k-means assignment on the GPU(s); the trained index stays on the CPU
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    if factory.startswith("OPQ"):  # fewer OPQ iterations: most of the gain comes early
        pre = faiss.downcast_index(index)
        opq = faiss.downcast_VectorTransform(pre.chain.at(0))
        opq.niter = min(opq.niter, 8)
        opq.niter_pq_0 = min(opq.niter_pq_0, cfg.kmeans_iters)
        opq.max_train_points = min(opq.max_train_points, 32768)
    if "HNSW" in factory:
        hnsw = faiss.downcast_index(index.index if hasattr(index, "id_map") else index)
        if hasattr(hnsw, "hnsw"):
            hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
    if not index.is_trained:
        if len(sample) == 0:
            raise IndexBuildError(f"{factory} needs training vectors but the sample is empty")
        pq_bits = re.search(r"PQ\d+(?:x(\d+))?", factory)
        need = 2 ** int(pq_bits.group(1) or 8) if pq_bits else 0
        if len(sample) < need:  # faiss' k-means of each sub-quantizer: 2^bits centroids
            raise IndexBuildError(f"{factory}: PQ codes need at least {need} training vectors, the source "
                                  f"has {len(sample)}: use ivf, hnsw or flat")
        if is_ivf(factory) and len(sample) < faiss.extract_index_ivf(index).nlist:
            raise IndexBuildError(f"{factory} has {faiss.extract_index_ivf(index).nlist} inverted lists but "
                                  f"only {len(sample)} vectors to train them: use fewer lists or flat")
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if is_ivf(factory):
        faiss.extract_index_ivf(index).clustering_index = None
    return index


WHITENING_FILE = "whitening.npz"


def _load_build_whitening(cfg: BuildConfig, meta):
    """The PCA-whitening of cfg.whitening (truncated to cfg.whiten_dim), checked against the
    source vectors' model and dimension; IndexBuildError names a mismatch."""
    from index.ann.whitening import WhiteningError, load_whitening

    try:
        w = load_whitening(cfg.whitening)
        if cfg.whiten_dim is not None:
            w = w.truncate(cfg.whiten_dim)
    except (WhiteningError, FileNotFoundError) as e:
        raise IndexBuildError(str(e)) from None
    if w.input_dim != meta.dim:
        raise IndexBuildError(f"whitening {cfg.whitening} takes {w.input_dim}-D vectors but the "
                              f"source has dim {meta.dim}")
    if w.model and w.model != meta.model:
        raise IndexBuildError(f"whitening {cfg.whitening} was fitted on model {w.model!r}, the "
                              f"source vectors come from {meta.model!r}")
    return w


def _recall_record(recall: float | None, cfg: BuildConfig, n_eval: int) -> dict:
    """The manifest's "recall": a recall@k only when it was measured on eval queries."""
    out = {"target": cfg.target_recall, "eval_queries": int(n_eval),
           "method": "held-back sample of the vectors as queries (added after tuning) vs exact search"}
    if recall is None:
        out.update(target_met=None, method="not measured: no vector to hold back as a query")
    else:
        out.update({f"recall@{cfg.recall_k}": float(recall), "target_met": bool(recall >= cfg.target_recall)})
    return out


def build_index(vectors: str, root: str, name: str, cfg: BuildConfig = BuildConfig(),
                publish: bool = True, version: str | None = None, progress=None,
                model_dir: str | None = None) -> BuildResult:
    """Build a new version of ``root/name`` from the Parquet file/dir `vectors`: the six steps
    of the module docstring, one function each. model_dir: the model directory that made the
    vectors, recorded in the manifest (image search and serving embed queries with it).

    Returns a BuildResult; with publish=True CURRENT points at the new version afterwards.
    Raises IndexBuildError / VectorFileError on bad input; nothing is left behind on error.
    """
    say = progress or (lambda msg: log.info(msg))
    t0 = time.perf_counter()
    timings = {}
    src = _open_source(vectors, cfg)  # 1.
    gpu = _gpu_enabled(cfg)
    say(f"{src.n_total} x {src.dim} {src.kind} -> {cfg.shards} shard(s) of {src.factory} "
        f"({'GPU' if gpu else 'CPU'})")
    train, eval_vecs, eval_ids = _sample(src, cfg, timings)  # 2.
    t = time.perf_counter()
    indexes = _train_shards(src, cfg, train, gpu)  # 3.
    del train
    timings["train_s"] = time.perf_counter() - t
    home = IndexHome.of(root, name)
    with home.new_version(version) as (ver, tmp):
        t = time.perf_counter()
        added = _add_vectors(src, cfg, indexes, tmp, eval_vecs, eval_ids, say if progress else None)  # 4.
        timings["add_s"] = time.perf_counter() - t
        t = time.perf_counter()
        params, recall = _tune_and_complete(src, cfg, indexes, eval_vecs, eval_ids, added, say)  # 5.
        timings["tune_s"] = time.perf_counter() - t
        t = time.perf_counter()
        graph = _write_rerank_graph(src, cfg, indexes, params, tmp, say)  # 5b. (optional)
        if graph:
            timings["rerank_graph_s"] = time.perf_counter() - t
        manifest = _write_version(src, cfg, indexes, tmp, ver, added.sizes, params, recall,  # 6.
                                  len(eval_ids), gpu, t0, timings, model_dir, graph)
    if publish:
        home.publish(ver)
    say(f"version {ver} written to {home.version_dir(ver)}"
        + (" and published" if publish else " (not published)"))
    return BuildResult(ver, home.version_dir(ver), manifest, publish, time.perf_counter() - t0, timings)


@dataclass
class _Source:
    """The vectors to index, as step 1 found them: dim / model after whitening (if any), the
    index type chosen, and which label columns the file has."""

    path: str
    meta: object
    kind: str
    n_total: int
    dim: int
    model: str
    whitening: object
    factory: str
    has_image: bool
    has_count: bool

    @property
    def label_cols(self) -> list[str]:
        return ["item_id"] + (["image_id"] if self.has_image else []) + (["count"] if self.has_count else [])

    def batches(self, columns, batch_size: int):
        """(labels, vectors (n, dim) float32) batches of the source, whitened when asked."""
        for labels, vecs in iter_vector_batches(self.path, batch_size, columns=columns):
            yield labels, (self.whitening.apply(vecs) if self.whitening is not None else vecs)


def _open_source(vectors: str, cfg: BuildConfig) -> _Source:
    """Step 1: count rows (Parquet metadata), check the file, choose the index type."""
    import faiss

    ds, meta, kind = _vector_source(vectors)
    n_total = ds.count_rows()
    if n_total == 0:
        raise IndexBuildError(f"{vectors}: no vectors to index")
    # one row per image (embeddings) or per item (centroids): a duplicate would be indexed
    # twice and answer twice (two copies of a shard: every id two rows)
    check_unique_file(vectors, kind)
    dim, model = meta.dim, meta.model
    whitening = _load_build_whitening(cfg, meta) if cfg.whitening else None
    if whitening is not None:
        from index.ann.whitening import whitened_model_id

        dim, model = whitening.dim, whitened_model_id(meta.model, whitening.dim)
    factory = choose_index_type(n_total, dim, cfg.shards, cfg)
    try:
        faiss.index_factory(dim, per_shard_factory(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(f"bad index type {factory!r}: {str(e).strip().splitlines()[-1]}") from None
    has_image = "image_id" in ds.schema.names
    has_count = not has_image and "count" in ds.schema.names  # centroids: images per item
    return _Source(vectors, meta, kind, n_total, dim, model, whitening, factory, has_image, has_count)


def _sample(src: _Source, cfg: BuildConfig, timings: dict):
    """Step 2 (pass 1): training sample (approximate types only) and held-back evaluation
    queries. Returns (train (n_train, dim) float32, eval_vecs (n_eval, dim) float32, eval_ids
    (n_eval,) int64 ascending)."""
    rng = np.random.default_rng(cfg.seed)
    n_train = 0
    if is_ivf(src.factory):
        nlist = int(re.search(r"IVF(\d+)", src.factory).group(1))
        n_train = min(src.n_total, max(nlist * cfg.train_points_per_list, 10_000 if "PQ" in src.factory else 0),
                      max(cfg.max_train_points, nlist * 39))
    # held back while tuning, so at most half the vectors: holding back all of a small set
    # (<= eval_queries vectors) left the shards empty ("merge_topk: no shard results").
    # Measured for exact Flat too: the manifest's recall is what a search achieved, never assumed.
    n_eval = min(cfg.eval_queries, src.n_total // 2)
    train = BottomKSample(n_train, src.dim, rng)
    evalq = BottomKSample(n_eval, src.dim, rng)
    if n_train or n_eval:
        t = time.perf_counter()
        offset = 0
        for _, vecs in src.batches([], cfg.batch_size):
            ids = np.arange(offset, offset + len(vecs), dtype=np.int64)
            train.add(vecs, ids)
            evalq.add(vecs, ids)
            offset += len(vecs)
        timings["sample_s"] = time.perf_counter() - t
    eval_vecs = np.ascontiguousarray(evalq.vecs)
    order = np.argsort(evalq.ids)
    return train.vecs, eval_vecs[order], evalq.ids[order]


def _train_shards(src: _Source, cfg: BuildConfig, train: np.ndarray, gpu: bool) -> list:
    """Step 3: one template trained on the sample, cloned per shard (one shared quantizer)."""
    import faiss

    template = train_template(src.factory, src.dim, train, cfg, gpu)
    return [faiss.clone_index(template) for _ in range(cfg.shards)]


@dataclass
class _Added:
    """What step 4 leaves: vectors per shard (S,) int64, the shard of each held-back
    evaluation query (n_eval,) int64, and their exact top-(recall_k + 1) (scores, ids)."""

    sizes: np.ndarray
    eval_shard: np.ndarray
    gt: tuple


def _add_vectors(src: _Source, cfg: BuildConfig, indexes: list, tmp: str, eval_vecs: np.ndarray,
                 eval_ids: np.ndarray, say=None) -> _Added:
    """Step 4 (pass 2): add every batch to its shard (blake2b(item_id) % S) with int64 ids,
    write the ids tables, accumulate the exact top-k of the evaluation queries."""
    n_eval = len(eval_ids)
    writers = [pq.ParquetWriter(os.path.join(tmp, shard_files(s)[1]), IDS_SCHEMA)
               for s in range(cfg.shards)]
    kk = cfg.recall_k + 1
    gt = (np.full((n_eval, kk), -np.inf, np.float32), np.full((n_eval, kk), -1, np.int64))
    offset = 0
    sizes = np.zeros(cfg.shards, dtype=np.int64)
    eval_shard = np.full(n_eval, -1, dtype=np.int64)
    try:
        for labels, vecs in src.batches(src.label_cols, cfg.batch_size):
            n = len(vecs)
            ids = np.arange(offset, offset + n, dtype=np.int64)
            offset += n
            items = labels.column("item_id")
            if items.null_count:
                raise VectorFileError(f"{src.path}: item_id has null values")
            if src.has_count:
                empty = np.flatnonzero(labels.column("count").fill_null(0).to_numpy() <= 0)
                if len(empty):
                    raise VectorFileError(f"{src.path}: item {items[int(empty[0])].as_py()!r} has no "
                                          "images (count 0): not a centroid")
            shard = shard_of(items.to_pylist(), cfg.shards)
            images = labels.column("image_id") if src.has_image else pa.nulls(n, pa.string())
            # evaluation queries are held back: added to the index only after tuning, so
            # they are unseen queries (a vector already in an HNSW graph is found too easily)
            held = np.isin(ids, eval_ids) if n_eval else np.zeros(n, dtype=bool)
            eval_shard[np.searchsorted(eval_ids, ids[held])] = shard[held]
            for s in np.unique(shard):
                sel = np.nonzero(shard == s)[0]
                add = sel[~held[sel]]
                indexes[s].add_with_ids(np.ascontiguousarray(vecs[add]), ids[add])
                take = pa.array(sel)
                writers[s].write_table(pa.table(
                    [pa.array(ids[sel]), items.take(take).cast(pa.string()),
                     images.take(take).cast(pa.string())], schema=IDS_SCHEMA))
                sizes[s] += len(sel)
            if n_eval and not held.all():
                # exact top-k among this batch's indexed (not held-back) vectors, merged in
                gt = merge_topk([gt, exact_search(eval_vecs, vecs[~held], kk, ids[~held])], kk)
            if say and offset % (cfg.batch_size * 16) < n:
                say(f"added {offset}/{src.n_total}")
    finally:
        for w in writers:
            w.close()
    if offset != src.n_total:
        raise IndexBuildError(f"{src.path}: read {offset} rows but the metadata counts {src.n_total}")
    return _Added(sizes, eval_shard, gt)


def _tune_and_complete(src: _Source, cfg: BuildConfig, indexes: list, eval_vecs: np.ndarray,
                       eval_ids: np.ndarray, added: _Added, say) -> tuple[dict, float | None]:
    """Step 5: tune nprobe / efSearch on the held-out queries (Flat: measure only), then add
    the held-back vectors to their shards. Returns (search params, recall or None)."""
    if len(eval_ids) == 0:  # a single vector: nothing to measure against, nothing recorded
        params, recall = {}, None
    else:
        params, recall = tune_search_params(indexes, src.factory, eval_vecs, eval_ids, added.gt[1],
                                            cfg.target_recall, cfg.recall_k)
        if recall < cfg.target_recall:
            say(f"warning: {src.factory} reaches recall@{cfg.recall_k}={recall:.4f} < target "
                f"{cfg.target_recall} at {params}")
    for s in range(cfg.shards):  # now the held-back vectors join their shards
        sel = np.nonzero(added.eval_shard == s)[0]
        if len(sel):
            indexes[s].add_with_ids(np.ascontiguousarray(eval_vecs[sel]), eval_ids[sel])
    return params, recall


def _write_rerank_graph(src: _Source, cfg: BuildConfig, indexes: list, params: dict, tmp: str,
                        say) -> dict | None:
    """Step 5b (cfg.rerank_graph > 0): every vector's cfg.rerank_graph nearest vectors in the
    finished shards (the index's own search, tuned parameters) and its farthest-point
    normaliser, stored as GRAPH_FILE for k-reciprocal at query time (index.rerank.graph).
    The normaliser is found as k-reciprocal's "auto" would for this many vectors: a k=1
    search of -x up to AUTO_SEARCH_MAX, else the largest distance to 8,192 sampled vectors,
    junk (item_id "-1") left out.
    Returns the manifest record, or None."""
    if not cfg.rerank_graph:
        return None
    k = min(cfg.rerank_graph, src.n_total)
    for idx in indexes:
        apply_search_params(idx, params)

    def search(x, kk):
        return merge_topk([idx.search(x, kk) for idx in indexes if idx.ntotal], kk)

    # the normalisers leave junk out, as k-reciprocal's union does (a first pass finds it)
    junk = np.concatenate([pc.equal(labels.column("item_id").cast(pa.string()), JUNK_ITEM)
                           .fill_null(False).to_numpy(zero_copy_only=False)
                           for labels, _ in src.batches(["item_id"], cfg.batch_size)])
    mode = resolve_max_distance("auto", src.n_total)
    sample, far_search = None, (None if not junk.any() or junk.all() else filtered_search_fn(search, ~junk))
    if mode == "sample":  # a second pass gathers the sampled rows
        kept = np.flatnonzero(~junk) if not junk.all() else np.arange(src.n_total)
        want = np.sort(np.random.default_rng(cfg.seed).choice(kept, min(8192, len(kept)), replace=False))
        sample, offset = np.empty((len(want), src.dim), np.float32), 0
        for _, vecs in src.batches(["item_id"], cfg.batch_size):
            sel = want[(want >= offset) & (want < offset + len(vecs))]
            sample[np.searchsorted(want, sel)] = vecs[sel - offset]
            offset += len(vecs)
    graph = build_gallery_graph((v for _, v in src.batches(["item_id"], cfg.batch_size)), search, k,
                                sample, far_search)
    save_gallery_graph(graph, os.path.join(tmp, GRAPH_FILE))
    say(f"rerank graph: {k} neighbours per vector, normalisers by {mode}")
    return {"file": GRAPH_FILE, "k": k, "far_mode": graph.far_mode}


def _write_version(src: _Source, cfg: BuildConfig, indexes: list, tmp: str, ver: str, sizes: np.ndarray,
                   params: dict, recall: float | None, n_eval: int, gpu: bool, t0: float,
                   timings: dict, model_dir: str | None = None, graph: dict | None = None) -> dict:
    """Step 6: shard files, the whitening file if any and the manifest into `tmp` (the version
    directory, renamed into place by IndexHome.new_version). Returns the manifest."""
    import faiss

    t = time.perf_counter()
    for s, idx in enumerate(indexes):
        faiss.write_index(idx, os.path.join(tmp, shard_files(s)[0]))
    timings["write_s"] = time.perf_counter() - t
    extra = {"rerank_graph": graph} if graph else {}
    whitening, meta, vectors = src.whitening, src.meta, src.path
    if whitening is not None:  # stored with the version: queries go through the same file
        whitening.save(os.path.join(tmp, WHITENING_FILE))
        extra["whitening"] = {"file": WHITENING_FILE, "input_model": meta.model,
                              "input_dim": meta.dim, "dim": whitening.dim,
                              "power": whitening.power, "fitted_on": whitening.n_samples}
    manifest = {
        "version": ver,
        "model": src.model,
        "dim": src.dim,
        "metric": METRIC,
        "normalized": True,
        "index_type": src.factory,
        "faiss_factory": per_shard_factory(src.factory),
        "exact": is_exact(src.factory),
        "num_shards": cfg.shards,
        "num_vectors": int(src.n_total),
        "shard_sizes": sizes.tolist(),
        "sharding": "blake2b64(item_id) % num_shards",
        "vector_kind": src.kind,
        "has_image_ids": src.has_image,
        "source": [os.path.abspath(vectors) if "://" not in vectors else vectors],
        "search_params": params,
        "recall": _recall_record(recall, cfg, n_eval),
        **extra,
        **({"model_dir": os.path.abspath(model_dir) if "://" not in str(model_dir) else str(model_dir)}
           if model_dir else {}),
        "build": {"seconds": round(time.perf_counter() - t0, 3), "gpu": gpu,
                  "faiss_version": faiss.__version__,
                  "config": asdict(cfg), "timings": {k: round(v, 3) for k, v in timings.items()}},
    }
    return finalize_manifest(tmp, manifest)
