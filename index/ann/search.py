"""Open a published sharded index and answer batches of queries.

`open_index(ROOT/NAME)` reads CURRENT once and loads that version (FAISS files memory-mapped
where the index type allows, ids tables in RAM). Every shard is searched for its own top-k and
the per-shard lists are merged by score (`merge_topk`: argpartition on S*k candidates, never a
full sort), ties broken by id so that 1 or 4 shards, threads or Ray give the same lists.

Two executions of the per-shard searches:
- ``executor="local"``: shards searched in parallel threads in this process (faiss releases the
  GIL during search);
- ``executor="ray"``: one Ray actor per shard (on a GPU when the cluster has GPUs), for indexes
  that do not fit one machine; the driver keeps only the ids tables.

A reader holds its own loaded indexes / open mmaps, so publishing, rolling back or pruning
while it runs does not disturb it.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.ann.versions import IndexVersionError, resolve_version, shard_files, verify_files

PAD_ID = -1


class IndexMismatchError(ValueError):
    """Queries that do not fit the index: wrong dimension, other model, NaN/inf."""


# ---------------------------------------------------------------------------------------------
# top-k primitives (pure numpy)


def _sort_rows(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score descending, ties by id ascending, padding (id -1) last."""
    pad = ids < 0
    key_id = np.where(pad, np.iinfo(np.int64).max, ids)
    key_score = np.where(pad, np.inf, -scores.astype(np.float64))
    order = np.lexsort((key_id, key_score), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def topk_rows(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of each row. scores: (Q, C) float32; ids: (Q, C) int64 with -1 = no candidate.

    Returns (Q, k) float32 scores (descending, -inf padding) and (Q, k) int64 ids (-1 padding).
    Uses argpartition (O(C) per row), then sorts only the k survivors.
    """
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    q, c = scores.shape
    if c > k:
        # ties at the partition boundary are resolved by id below: partition on a score key
        # nudged by id rank is overkill; instead keep every candidate tied with the k-th score
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, part, 1).min(axis=1, keepdims=True)
        if np.any((scores == kth).sum(1) > (np.take_along_axis(scores, part, 1) == kth).sum(1)):
            # rare exact ties straddle the boundary: fall back to a deterministic sort of all
            s, i = _sort_rows(scores, ids)
            return s[:, :k], i[:, :k]
        scores = np.take_along_axis(scores, part, 1)
        ids = np.take_along_axis(ids, part, 1)
    s, i = _sort_rows(scores, ids)
    if c < k:  # fewer candidates than k: pad
        s = np.concatenate([s, np.full((q, k - c), -np.inf, np.float32)], 1)
        i = np.concatenate([i, np.full((q, k - c), PAD_ID, np.int64)], 1)
    return s, i


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists [(scores (Q, k_s), ids (Q, k_s)), ...] into the global top-k."""
    if not parts:
        raise ValueError("merge_topk: no shard results")
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts], axis=1)
    return topk_rows(scores, ids, k)


def exact_search(queries: np.ndarray, vectors: np.ndarray, k: int, ids: np.ndarray | None = None,
                 block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Brute force inner-product top-k: numpy matmul + argpartition, in query blocks so no
    (Q, N) matrix is held whole (a block costs block * N * 12 bytes). queries: (Q, D) float32;
    vectors: (N, D) float32; ids: (N,) int64 (default 0..N-1). Returns (Q, k) float32 scores
    (descending, ties by id) and (Q, k) int64 ids, padded with -inf / -1 when N < k."""
    queries = np.asarray(queries, dtype=np.float32)
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    n = len(vectors)
    out_s, out_i = [], []
    for start in range(0, len(queries), block):
        sims = queries[start:start + block] @ vectors.T
        if n > k:
            part = np.argpartition(sims, n - k, axis=1)[:, n - k:]  # the k largest, unordered
            s, i = topk_rows(np.take_along_axis(sims, part, 1), ids[part], k)
        else:
            s, i = topk_rows(sims, np.broadcast_to(ids, sims.shape), k)
        out_s.append(s)
        out_i.append(i)
    if not out_s:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(out_s), np.concatenate(out_i)


# ---------------------------------------------------------------------------------------------
# loading shards


def read_faiss(path: str, mmap: bool = True):
    """Read one FAISS index, memory-mapped where the index type allows (falls back to a read)."""
    import faiss

    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            pass
    return faiss.read_index(path)


def apply_search_params(index, params: dict) -> None:
    """Set nprobe / efSearch (through IDMap / PreTransform wrappers) on a loaded index."""
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in (params or {}).items():
        ps.set_index_parameter(index, name, value)


def _to_gpu_if_possible(index):
    import faiss

    if faiss.get_num_gpus() <= 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:  # e.g. HNSW has no GPU version: search it on the CPU
        return index


@dataclass
class SearchHits:
    """Merged results. scores: (Q, k) float32 descending (-inf padding); ids: (Q, k) int64
    (-1 padding); item_ids: (Q, k) object (None padding); image_ids: (Q, k) object or None
    when the index holds centroids."""

    scores: np.ndarray
    ids: np.ndarray
    item_ids: np.ndarray | None = None
    image_ids: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        return self.ids >= 0


class _LocalShards:
    """Shards loaded in this process, searched in parallel threads."""

    def __init__(self, vdir: str, manifest: dict, mmap: bool, use_gpu: bool):
        self.indexes = []
        for s in range(manifest["num_shards"]):
            idx = read_faiss(os.path.join(vdir, shard_files(s)[0]), mmap=mmap)
            if use_gpu:
                idx = _to_gpu_if_possible(idx)
            apply_search_params(idx, manifest.get("search_params") or {})
            self.indexes.append(idx)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.indexes)),
                                        thread_name_prefix="shard")

    def search(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if not self.indexes:
            raise RuntimeError("the index was closed: no shards to search")

        def one(idx):
            if idx.ntotal == 0:
                q = len(queries)
                return np.full((q, 1), -np.inf, np.float32), np.full((q, 1), PAD_ID, np.int64)
            # faiss allocates (Q, k) whatever the shard holds: never ask for more than it has
            return idx.search(queries, min(k, idx.ntotal))

        return list(self._pool.map(one, self.indexes))

    def ntotal(self) -> int:
        return int(sum(i.ntotal for i in self.indexes))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.indexes = []


class _RayShards:
    """One Ray actor per shard; each actor loads (mmaps) its own shard file."""

    def __init__(self, vdir: str, manifest: dict, mmap: bool, verify: bool):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("executor='ray' needs ray.init() (pipelines call init_ray) first")
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus)(ShardActor)
        params = manifest.get("search_params") or {}
        self.actors = []
        for s in range(manifest["num_shards"]):
            name = shard_files(s)[0]
            entry = (manifest["files"][name] if verify else None)
            self.actors.append(actor_cls.remote(os.path.join(vdir, name), params, mmap, entry, gpus > 0))
        self._ray = ray
        self._ntotal = sum(ray.get([a.ntotal.remote() for a in self.actors]))  # waits for loads

    def search(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if not self.actors:
            raise RuntimeError("the index was closed: no shard actors to search")
        ref = self._ray.put(queries)  # one copy in the object store for all actors
        return self._ray.get([a.search.remote(ref, k) for a in self.actors])

    def ntotal(self) -> int:
        return self._ntotal

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []


class ShardActor:
    """Holds one shard (Ray actor body; also usable in-process)."""

    def __init__(self, path: str, params: dict, mmap: bool = True, verify_entry: dict | None = None,
                 use_gpu: bool = False):
        if verify_entry is not None:
            verify_files(os.path.dirname(path), {"files": {os.path.basename(path): verify_entry}})
        self.index = read_faiss(path, mmap=mmap)
        if use_gpu:
            self.index = _to_gpu_if_possible(self.index)
        apply_search_params(self.index, params)

    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index.ntotal == 0:
            q = len(queries)
            return np.full((q, 1), -np.inf, np.float32), np.full((q, 1), PAD_ID, np.int64)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.index.ntotal))


class ShardedIndex:
    """A loaded index version. Use `open_index` to get one; `search` answers query batches."""

    def __init__(self, path: str, version: str, vdir: str, manifest: dict, backend, labels: pa.Table,
                 whitening=None):
        self.path = path
        # PCA-whitening stored with the version (index.ann.whitening.PCAWhitening) or None: queries
        # of the input model are whitened before the search
        self.whitening = whitening
        self.version = version
        self.dir = vdir
        self.manifest = manifest
        self._backend = backend
        self._ids = labels.column("id").to_numpy()
        self._labels = labels
        self.has_images = labels.column("image_id").null_count < len(labels)

    # --- properties ---
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def ntotal(self) -> int:
        return self._backend.ntotal()

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def input_model(self) -> str:
        """The model whose raw embeddings this index answers: with whitening, the model the
        whitening was fitted on (its vectors are whitened here); else `model`."""
        return str(self.manifest["whitening"]["input_model"]) if self.whitening is not None else self.model

    def query_dim(self, model: str | None = None) -> int:
        """Dimension expected of queries embedded by `model` (the raw dimension for the input
        model of a whitened index, else the index dimension)."""
        if self.whitening is not None and model is not None and str(model) == self.input_model:
            return self.whitening.input_dim
        return self.dim

    # --- checks ---
    def check_model(self, model: str) -> None:
        """Raise IndexMismatchError if queries embedded by `model` cannot be searched here."""
        if str(model) not in (self.model, self.input_model):
            raise IndexMismatchError(f"queries come from model {model!r} but index {self.path} "
                                     f"(version {self.version}) was built from model {self.input_model!r}")

    def to_index_space(self, queries: np.ndarray, model: str | None) -> np.ndarray:
        """Queries embedded by `model` -> vectors comparable with the index: whitened (and
        re-normalised) when the index stores a whitening and `model` is its input model."""
        if self.whitening is not None and model is not None and str(model) == self.input_model:
            q = np.asarray(queries)
            if q.ndim != 2 or q.shape[1] != self.whitening.input_dim:
                raise IndexMismatchError(f"query dimension {q.shape[-1]} does not match the input "
                                         f"dimension {self.whitening.input_dim} of the index's whitening")
            if not np.isfinite(q).all():
                bad = int((~np.isfinite(q)).any(axis=1).sum())
                raise IndexMismatchError(f"{bad} query row(s) contain NaN or inf")
            return self.whitening.apply(q)
        return queries

    def check_queries(self, queries: np.ndarray, model: str | None = None) -> np.ndarray:
        """Validate queries (Q, D) float32 against the index (whitening them first when `model`
        is the input model of a whitened index); returns a contiguous float32 copy or view.
        Raises IndexMismatchError naming the problem."""
        if model is not None:
            self.check_model(model)
            queries = self.to_index_space(queries, model)
        q = np.asarray(queries)
        if q.ndim != 2:
            raise IndexMismatchError(f"queries must be a 2-D (Q, D) array, got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise IndexMismatchError(f"query dimension {q.shape[1]} does not match index dimension "
                                     f"{self.dim} ({self.path}, version {self.version})")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            bad = int((~np.isfinite(q)).any(axis=1).sum())
            raise IndexMismatchError(f"{bad} query row(s) contain NaN or inf")
        return q

    # --- search ---
    def search(self, queries: np.ndarray, k: int, labels: bool = True, model: str | None = None
               ) -> SearchHits:
        """Top-k over all shards. queries: (Q, D) float32, L2-normalised. Returns SearchHits
        with (Q, min(k, len(self))) arrays (an index of N vectors has no more than N answers,
        and a k beyond that would only allocate padding); with labels=True also item_ids /
        image_ids."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), max(1, len(self)))
        q = self.check_queries(queries, model)
        if len(q) == 0:
            hits = SearchHits(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
        else:
            scores, ids = merge_topk(self._backend.search(q, k), k)
            hits = SearchHits(scores, ids)
        if labels:
            hits.item_ids, hits.image_ids = self.lookup(hits.ids)
        return hits

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """int64 ids (any shape, -1 = padding) -> (item_ids, image_ids or None), object arrays of
        the same shape with None at padding."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        valid = flat >= 0
        pos = np.searchsorted(self._ids, flat[valid])
        if len(pos) and (pos.max() >= len(self._ids) or np.any(self._ids[pos] != flat[valid])):
            raise IndexVersionError(f"{self.dir}: search returned ids missing from the ids tables")
        take = pa.array(pos, pa.int64())
        items = np.full(flat.shape, None, dtype=object)
        items[valid] = self._labels.column("item_id").take(take).to_numpy(zero_copy_only=False)
        images = None
        if self.has_images:
            images = np.full(flat.shape, None, dtype=object)
            images[valid] = self._labels.column("image_id").take(take).to_numpy(zero_copy_only=False)
            images = images.reshape(ids.shape)
        return items.reshape(ids.shape), images

    def close(self) -> None:
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_ids_tables(vdir: str, num_shards: int) -> pa.Table:
    """All shards' ``id -> item_id, image_id`` tables, concatenated and sorted by id."""
    tables = [pq.read_table(os.path.join(vdir, shard_files(s)[1]), columns=["id", "item_id", "image_id"])
              for s in range(num_shards)]
    table = pa.concat_tables(tables) if tables else None
    return table.sort_by("id")


def open_index(path: str, verify: bool = False, mmap: bool = True, executor: str = "local",
               use_gpu: bool | None = None, version: str | None = None, retries: int = 5
               ) -> ShardedIndex:
    """Open ``ROOT/NAME`` at the version CURRENT names (or `version`, or a version directory).

    verify: check the sha256 of every file against the manifest first (slow for big indexes).
    executor: "local" (threads) or "ray" (one actor per shard; Ray must be initialised).
    use_gpu: move shards to the GPU(s) (default: when faiss sees GPUs). Raises
    IndexVersionError for a missing / incomplete / tampered version.
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    for attempt in range(retries):
        home, ver = resolve_version(path, version)
        vdir = home.version_dir(ver)
        try:
            manifest = home.manifest(ver)
            if verify:
                verify_files(vdir, manifest)
            if use_gpu is None:
                import faiss

                use_gpu = faiss.get_num_gpus() > 0
            labels = read_ids_tables(vdir, manifest["num_shards"])
            whitening = None
            if manifest.get("whitening"):
                from index.ann.whitening import load_whitening

                whitening = load_whitening(os.path.join(vdir, manifest["whitening"]["file"]))
            if executor == "ray":
                backend = _RayShards(vdir, manifest, mmap, verify)
            else:
                backend = _LocalShards(vdir, manifest, mmap, use_gpu)
        except (OSError, RuntimeError, IndexVersionError) as e:  # faiss I/O errors are RuntimeError
            # CURRENT moved on and the version we read was pruned in between: read CURRENT again
            if version is None and attempt + 1 < retries and not os.path.isdir(vdir):
                continue
            if isinstance(e, IndexVersionError):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise IndexVersionError(f"{vdir}: cannot load index version: {msg}") from None
        idx = ShardedIndex(str(path), ver, vdir, manifest, backend, labels, whitening)
        if idx.ntotal != len(idx):
            idx.close()
            raise IndexVersionError(f"{vdir}: shards hold {idx.ntotal} vectors but ids tables {len(idx)}")
        return idx
    raise IndexVersionError(f"{path}: could not open a stable version")  # pragma: no cover
