"""Nightly re-indexing, vector side: work-dir state, incremental centroids, the quality gate,
the publish lock and the run log. The image side (embedding new/changed images) is injected
as a callable, so this module never imports `model` (pipelines/reindex.py supplies it).

One run (`Reindexer.run`):

1. ``embed``: the injected embed function writes ``WORK/gen-G/embeddings`` (the embeddings
   contract + ``content_hash``), carrying over unchanged rows from the newest complete earlier
   output (image id, content hash, labels and model id are the cache key);
2. ``centroids``: the rows that differ from the committed generation (added / removed, by the
   same key) become per-(item, camera) sum deltas; only the touched items of
   ``item_camera_sums.parquet`` / ``centroids.parquet`` are recomputed, everything else is
   copied (streamed). A model change (or the first run) recomputes everything;
3. ``build``: a new index version from the centroids (or the embeddings), not published;
4. ``gate``: the validation queries are searched against the new version and the published
   one with the same k (``gate_k``, never capped by a gallery's size); the new one passes when
   its mAP@k over ALL validation queries (a query that lost its matches scores 0) does not drop
   by more than ``max_drop``, its gallery did not shrink by more than ``max_shrink``, and its
   manifest's recall reaches ``target_recall``. An index's centroids are all-camera ones, so its
   figure is labelled ``scoring: index-centroids-all-cameras`` and only compared with another
   figure scored the same way;
5. ``publish`` (atomic CURRENT swap), ``commit`` (``state.json``), ``prune`` (keep N versions).

Crash safety: every output is written under a temporary name and renamed complete;
``state.json`` (the committed generation) is replaced atomically only after a run's data is
complete; ``pending.json`` names what the running generation may leave behind (its reserved
version name), so the next run removes an unpublished version of a killed run, or commits the
run if it was killed right after publishing. Re-running after a kill at any point therefore
ends with one embeddings row per gallery image and CURRENT naming a complete version.

Work dir layout::

    WORK/state.json        committed generation (paths relative to WORK), published version,
                           validation mAP of published versions
    WORK/pending.json      the generation being built (absent between runs)
    WORK/gen-NNNNNN/embeddings/   embed output (part-*.parquet, _errors.parquet, _embed.json)
    WORK/gen-NNNNNN/centroids/    centroids.parquet + item_camera_sums.parquet
    WORK/reindex.jsonl     run log: one JSON object per step (counts, seconds)
    WORK/.reindex.lock     flock()ed by the running run (so is ROOT/NAME/.reindex.lock)
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.keys import KEY_COLUMNS, row_keys
from contracts.storage import atomic_dir, write_text_atomic
from contracts.vectors import (
    VectorFileError,
    VectorTable,
    arrow_to_embeddings,
    camera_array,
    centroids_schema,
    check_schema,
    make_centroids_table,
    open_dataset,
    read_vectors,
)
from index.ann.versions import IndexHome, new_version_name, read_small_file
from index.centroids import aggregate as C

STATE_FILE = "state.json"
PENDING_FILE = "pending.json"
LOG_FILE = "reindex.jsonl"
LOCK_FILE = ".reindex.lock"
CENTROIDS_FILE = "centroids.parquet"
SUMS_FILE = "item_camera_sums.parquet"
STEPS = ("embed", "centroids", "build", "gate", "publish", "commit", "prune")
INDEX_KINDS = ("centroids", "embeddings")
GATE_HISTORY = 50  # validation reports kept in state.json (published versions only)


class ReindexError(RuntimeError):
    """A run that cannot go on (inconsistent work dir, bad validation set, ...)."""


class LockHeldError(ReindexError):
    """Another run holds the work-dir or index lock."""


class GateRefused(ReindexError):
    """The new version is worse than the published one (or misses the recall target)."""


# ---------------------------------------------------------------------------------------------
# small file helpers


MAX_STATE_BYTES = 16 << 20  # state.json / pending.json / _embed.json: small by construction


def read_json(path: str) -> dict | None:
    """A JSON file's object, or None when the file does not exist. Refused (one line, never the
    content): not a regular file, over MAX_STATE_BYTES, not JSON, not an object."""
    try:
        data = read_small_file(path, MAX_STATE_BYTES, "work-dir file", ReindexError)
        obj = json.loads(data)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # written atomically, so this is outside damage
        raise ReindexError(f"{path}: unreadable JSON ({type(e).__name__} at byte {getattr(e, 'pos', '?')}); "
                           "restore or delete it") from None
    if not isinstance(obj, dict):
        raise ReindexError(f"{path}: not a JSON object; restore or delete it")
    return obj


def write_json_atomic(path: str, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def remove_tree(path: str) -> None:
    """Remove a directory: renamed aside first, so a kill mid-way never leaves a partial one
    under its real name."""
    if not os.path.lexists(path):
        return
    parent, base = os.path.split(path.rstrip("/"))
    aside = os.path.join(parent, f".tmp-del-{base}-{uuid.uuid4().hex[:6]}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


class RunLog:
    """Append-only JSON-lines log (one object per event, flushed and fsynced). A line cut by a
    kill is skipped by `read_log`."""

    def __init__(self, path: str, run_id: str):
        self.path, self.run_id = path, run_id

    def write(self, step: str, status: str, **fields) -> dict:
        event = {"time": _now(), "run": self.run_id, "step": step, "status": status, **fields}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(event, sort_keys=True, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return event


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def read_log(path: str) -> list[dict]:
    """All complete events of a run log (a torn last line is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# the lock


class RunLock:
    """Exclusive, non-blocking ``flock`` on `path` for the lifetime of the context. The kernel
    drops it when the process dies (even on SIGKILL), so there is no stale lock to detect.
    The holder's pid and start time are written into the file for the error message."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise LockHeldError(f"another reindex run holds the lock {self.path}"
                                    + (f" ({holder})" if holder else "")) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {_now()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def reindex_locks(work: str, home: IndexHome) -> Iterator[None]:
    """Both locks: the work dir's (two runs never share state) and the index's (two runs with
    different work dirs never publish the same index at once)."""
    with RunLock(os.path.join(work, LOCK_FILE)), RunLock(os.path.join(home.path, LOCK_FILE)):
        yield


# ---------------------------------------------------------------------------------------------
# what changed between two embeddings outputs


def read_keys(emb_dir: str) -> np.ndarray:
    """Sorted (N,) int64 row keys (contracts.keys.row_keys) of every row of an embeddings output
    (labels and hashes only, no vectors)."""
    ds = open_dataset(emb_dir)
    cols = [c for c in KEY_COLUMNS if c in ds.schema.names]
    if "content_hash" not in cols:
        raise VectorFileError(f"{emb_dir}: no content_hash column (not written by embed)")
    keys = [row_keys(b) for b in ds.to_batches(columns=cols) if b.num_rows]
    return np.sort(np.concatenate(keys)) if keys else np.empty(0, np.int64)


def _not_in(keys: np.ndarray) -> Callable[[pa.RecordBatch], pa.Array]:
    """keep(batch): rows whose key is not in `keys` (sorted int64)."""
    def keep(b: pa.RecordBatch) -> pa.Array:
        return pa.array(~np.isin(row_keys(b), keys))
    return keep


@dataclass
class Delta:
    """Embeddings rows that differ between two outputs, as pair sums (see index.centroids.aggregate)."""

    added: C.PairSums
    removed: C.PairSums
    n_added: int
    n_removed: int

    @property
    def touched_items(self) -> np.ndarray:
        ids = np.concatenate([self.added.item_ids, self.removed.item_ids]).astype(str)
        return np.unique(ids).astype(object)


def _sums_of_rows(emb_dir: str, keep: Callable[[pa.RecordBatch], pa.Array], dim: int,
                  batch_size: int) -> tuple[C.PairSums, int]:
    """Pair sums of the rows of `emb_dir` where keep(batch) is true, streamed."""
    ds = open_dataset(emb_dir)
    cols = [c for c in (*KEY_COLUMNS, "embedding") if c in ds.schema.names]
    parts, n = [], 0
    for b in ds.to_batches(columns=cols, batch_size=batch_size):
        if b.num_rows == 0:
            continue
        mask = keep(b)
        if not pc.any(mask).as_py():
            continue
        sel = pa.Table.from_batches([b]).filter(mask)
        vecs = arrow_to_embeddings(sel.column("embedding"), what=f"{emb_dir}: embedding")
        cams = C.camera_codes(sel.column("camera_id") if "camera_id" in sel.column_names else None,
                              sel.num_rows)
        parts.append(C.partial_sums(np.asarray(sel.column("item_id").to_pylist(), dtype=object), cams, vecs))
        n += sel.num_rows
    return (C.combine(parts) if parts else C.empty_pair_sums(dim)), n


def diff_embeddings(old_dir: str, new_dir: str, batch_size: int = 65536) -> Delta:
    """Rows of `new_dir` whose key is not in `old_dir` (added: new or changed images) and rows
    of `old_dir` whose key is not in `new_dir` (removed: gone or changed images), summed per
    (item, camera). Memory: the keys of both sides plus the touched pairs' sums."""
    dim = check_schema(open_dataset(new_dir).schema, "embeddings", new_dir).dim
    old_keys, new_keys = read_keys(old_dir), read_keys(new_dir)
    added, n_added = _sums_of_rows(new_dir, _not_in(old_keys), dim, batch_size)
    removed, n_removed = _sums_of_rows(old_dir, _not_in(new_keys), dim, batch_size)
    return Delta(added, removed, n_added, n_removed)


# ---------------------------------------------------------------------------------------------
# centroids: full and incremental (the centroids pipeline's output layout)


@dataclass
class CentroidStats:
    items: int
    images: int
    pairs: int
    touched_items: int
    mode: str  # "full" | "incremental"


def _write_centroid_files(tmp: str, model: str, dim: int,
                          sums_tables: Iterator[pa.Table], cent_tables: Iterator[pa.Table]) -> tuple[int, int, int]:
    """Stream tables into tmp/item_camera_sums.parquet and tmp/centroids.parquet.
    Returns (items, images, pairs)."""
    items = images = pairs = 0
    with pq.ParquetWriter(os.path.join(tmp, SUMS_FILE), C.sums_schema(dim, model)) as sw:
        for t in sums_tables:
            if t.num_rows:
                sw.write_table(t.cast(C.sums_schema(dim, model)))
                pairs += t.num_rows
    with pq.ParquetWriter(os.path.join(tmp, CENTROIDS_FILE), centroids_schema(dim, model)) as cw:
        for t in cent_tables:
            if t.num_rows:
                cw.write_table(t.cast(centroids_schema(dim, model)))
                items += t.num_rows
                images += int(pc.sum(t.column("count")).as_py() or 0)
    return items, images, pairs


def _centroids_table(c: C.Centroids, model: str, dim: int) -> pa.Table:
    if len(c) == 0:
        return centroids_schema(dim, model).empty_table()
    return make_centroids_table(c.item_ids, c.embeddings, c.counts, c.camera_ids, model)


def compute_centroids(emb_dir: str, out_dir: str, batch_size: int = 65536) -> CentroidStats:
    """All items' centroids and pair sums of an embeddings output, streamed in batches (memory:
    one float64 sum per (item, camera) pair). Writes out_dir atomically."""
    meta = check_schema(open_dataset(emb_dir).schema, "embeddings", emb_dir)
    sums, n = _sums_of_rows(emb_dir, lambda b: pa.array(np.ones(b.num_rows, bool)), meta.dim, batch_size)
    if n == 0:
        raise VectorFileError(f"{emb_dir}: no embeddings rows")
    cents = C.finalize(sums)
    with atomic_dir(out_dir) as tmp:
        items, images, pairs = _write_centroid_files(
            tmp, meta.model, meta.dim, iter([C.pair_sums_to_table(sums, meta.model)]),
            iter([_centroids_table(cents, meta.model, meta.dim)]))
    return CentroidStats(items, images, pairs, items, "full")


def update_centroids(old_dir: str, delta: Delta, out_dir: str, model: str, dim: int,
                     batch_size: int = 65536) -> CentroidStats:
    """old centroids dir + delta -> out_dir (atomically). Pairs and centroids of untouched items
    are streamed through unchanged; touched items get old pairs + added - removed, and their
    centroids re-finalised (an item left with no image disappears)."""
    touched = delta.touched_items
    touched_set = pa.array(touched.astype(str), pa.string())
    old_sums_path = os.path.join(old_dir, SUMS_FILE)
    old_cents_path = os.path.join(old_dir, CENTROIDS_FILE)
    for p in (old_sums_path, old_cents_path):
        if not os.path.isfile(p):
            raise ReindexError(f"{p}: missing from the committed state; delete {os.path.dirname(old_dir)} "
                               "and state.json to rebuild from scratch")
    old_touched: list[C.PairSums] = []
    state: dict = {}

    def sums_tables() -> Iterator[pa.Table]:
        for b in pq.ParquetFile(old_sums_path).iter_batches(batch_size=batch_size):
            t = pa.Table.from_batches([b])
            hit = pc.is_in(t.column("item_id"), value_set=touched_set)
            if pc.any(hit).as_py():
                old_touched.append(C.pair_sums_from_table(t.filter(hit), old_sums_path))
            yield t.filter(pc.invert(hit))
        parts = [*old_touched, delta.added, C.negate(delta.removed)]
        try:
            new = C.combine(parts)
        except VectorFileError as e:
            raise ReindexError(f"{old_dir}: committed sums do not match the committed embeddings ({e})") from None
        state["touched"] = new
        yield C.pair_sums_to_table(new, model)

    def cent_tables() -> Iterator[pa.Table]:
        for b in pq.ParquetFile(old_cents_path).iter_batches(batch_size=batch_size):
            t = pa.Table.from_batches([b])
            yield t.filter(pc.invert(pc.is_in(t.column("item_id"), value_set=touched_set)))
        yield _centroids_table(C.finalize(state["touched"]), model, dim)

    with atomic_dir(out_dir) as tmp:
        items, images, pairs = _write_centroid_files(tmp, model, dim, sums_tables(), cent_tables())
    return CentroidStats(items, images, pairs, len(touched), "incremental")


# ---------------------------------------------------------------------------------------------
# the gate


@dataclass
class GalleryLabels:
    """Per-image labels of the gallery an index version was built from (for relevant counts and
    the ReID rule). cams: (N,) int64 (-1 unknown) or None."""

    item_ids: np.ndarray
    image_ids: np.ndarray | None
    cams: np.ndarray | None


def gallery_labels(emb_dir: str) -> GalleryLabels:
    """Labels of an embeddings output (no vectors read)."""
    ds = open_dataset(emb_dir)
    cols = [c for c in ("image_id", "item_id", "camera_id") if c in ds.schema.names]
    t = ds.to_table(columns=cols)
    cams = camera_array(t.column("camera_id")) if "camera_id" in t.column_names else None
    return GalleryLabels(np.asarray(t.column("item_id").to_pylist(), dtype=object),
                         np.asarray(t.column("image_id").to_pylist(), dtype=object), cams)


def index_labels(home: IndexHome, version: str) -> GalleryLabels:
    """Labels from a version's ids tables (when its source embeddings are unknown): no cameras."""
    from index.ann.search import read_ids_tables

    man = home.manifest(version)
    t = read_ids_tables(home.version_dir(version), man["num_shards"])
    images = t.column("image_id")
    return GalleryLabels(np.asarray(t.column("item_id").to_pylist(), dtype=object),
                         None if images.null_count == len(images) else
                         np.asarray(images.to_pylist(), dtype=object), None)


def evaluate_version(home: IndexHome, version: str, queries: VectorTable, labels: GalleryLabels,
                     k: int = 100, use_cameras: bool = True) -> dict:
    """Search `queries` against index `version` (top-k) and score the ranked lists
    (index.evaluation.protocol.per_query_metrics_from_results). Returns the evaluation report (mAP@k over
    valid queries etc.) plus version, k, model, num_vectors, `scoring` (what the figure measures:
    an index's centroids are all-camera ones, not the protocol's) and `gate_mAP`: the mean AP@k
    over ALL validation queries, a query with no match in this version scoring 0, which is the
    figure two versions are compared on (same queries, same k, whatever each gallery holds)."""
    from index.evaluation.protocol import make_report, per_query_metrics_from_results, results_scoring
    from contracts.results import make_results_table
    from index.ann.search import open_index

    with open_index(home.path, version=version) as idx:
        if queries.meta.model != idx.model:
            raise ReindexError(f"validation queries come from model {queries.meta.model}, index version "
                               f"{version} from model {idx.model}")
        n_vectors = len(idx)
        hits = idx.search(queries.vectors, max(1, min(k, n_vectors)))
        model = idx.model
    results = make_results_table(queries.image_ids, hits.item_ids, hits.image_ids, hits.scores, hits.valid)
    q_cams = queries.camera_ids if use_cameras else None
    g_cams = labels.cams if use_cameras else None
    image_ids = labels.image_ids if labels.image_ids is not None else np.full(len(labels.item_ids), None, object)
    # k is the gate's k, not capped by this gallery's size: a shorter list just holds fewer hits
    per_query, _, mode = per_query_metrics_from_results(
        results, queries.item_ids, queries.image_ids, q_cams, labels.item_ids, image_ids, g_cams, k)
    ap = np.where(per_query.valid, np.nan_to_num(per_query.ap), 0.0)
    return make_report(per_query, mode, None, k=k, version=version, model=model, num_vectors=n_vectors,
                       scoring=results_scoring(mode, q_cams is not None and g_cams is not None),
                       gate_mAP=float(ap.sum() / max(len(ap), 1)))


@dataclass
class GateDecision:
    passed: bool
    reason: str
    new: dict
    old: dict | None
    recall: float | None


def gate_decision(new: dict, old: dict | None, recall: float | None, target_recall: float,
                  max_drop: float, max_shrink: float = 1.0) -> GateDecision:
    """Pass when the new version has valid validation queries, its index recall reaches the
    target, its gallery did not shrink by more than `max_shrink` (a fraction of the published
    one's vectors), and its gate mAP (`gate_mAP`: mean AP@k over all validation queries, a query
    that lost its matches scoring 0) is at most `max_drop` below the published one's (`old`,
    None = nothing published yet). Both reports must score the same way with the same k and
    queries; otherwise ReindexError (the figures are not comparable)."""
    if new["num_valid_queries"] == 0:
        return GateDecision(False, f"none of the {new['num_queries']} validation queries has a true match "
                                   "in the new version", new, old, recall)
    if recall is not None and recall < target_recall:
        return GateDecision(False, f"index recall {recall:.4f} is below the target {target_recall}",
                            new, old, recall)
    if old is None:
        return GateDecision(True, f"validation mAP@{new.get('k')} {_gate_map(new):.4f} over "
                                  f"{new['num_queries']} queries; nothing published yet", new, old, recall)
    for key in ("k", "num_queries", "scoring"):
        if key in old and key in new and old[key] != new[key]:
            raise ReindexError(f"cannot compare with published version {old.get('version')}: its validation "
                               f"figure has {key}={old[key]!r}, the new one {key}={new[key]!r}; pass --published-validation "
                               "to evaluate it again, or publish by hand (index_versions.py publish)")
    old_n, new_n = old.get("num_vectors"), new.get("num_vectors")
    if old_n and new_n is not None and new_n < (1 - max_shrink) * old_n - 1e-9:
        return GateDecision(False, f"the gallery shrank from {old_n} to {new_n} vectors "
                                   f"({1 - new_n / old_n:.0%} > --max-shrink {max_shrink:.0%})", new, old, recall)
    lost = (new["num_queries"] - new["num_valid_queries"]
            - (old.get("num_queries", 0) - old.get("num_valid_queries", 0)))
    lost_note = f"; {lost} validation queries lost their matches (scored 0)" if lost > 0 else ""
    drop = _gate_map(old) - _gate_map(new)
    if drop > max_drop + 1e-12:
        return GateDecision(False, f"validation mAP@{new.get('k')} fell from {_gate_map(old):.4f} "
                                   f"(version {old.get('version')}) to {_gate_map(new):.4f} "
                                   f"(drop {drop:.4f} > max drop {max_drop}){lost_note}", new, old, recall)
    return GateDecision(True, f"validation mAP@{new.get('k')} {_gate_map(new):.4f} vs published "
                              f"{_gate_map(old):.4f} over {new['num_queries']} queries "
                              f"(drop {max(drop, 0):.4f} <= {max_drop}){lost_note}", new, old, recall)


def _gate_map(report: dict) -> float:
    """The figure the gate compares: gate_mAP (all queries, no match = 0). Reports recorded before
    it existed only hold the valid-query mAP, rescaled here to all queries."""
    if "gate_mAP" in report:
        return float(report["gate_mAP"])
    if "num_valid_queries" not in report or "num_queries" not in report:
        return float(report["mAP"])
    return float(report["mAP"]) * report["num_valid_queries"] / max(report["num_queries"], 1)


def version_recall(manifest: dict) -> float | None:
    """The achieved recall recorded by build_index (1.0 for exact indexes)."""
    rec = manifest.get("recall") or {}
    vals = [v for key, v in rec.items() if key.startswith("recall@")]
    if vals:
        return float(vals[0])
    return 1.0 if manifest.get("exact") else None


# ---------------------------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class ReindexConfig:
    """One nightly run. model_id: the id of the model the embed function uses (checked against
    the validation queries before any work). index_kind / shards: index the centroids or the
    image embeddings, in how many shards (None: as the published version, see resolve_layout).
    max_shrink: the largest fraction of the published version's vectors a new version may lack
    (the gate refuses more). kill_after: a step name after which the process SIGKILLs itself
    (crash tests only)."""

    work: str
    index_root: str
    name: str
    validation: str
    model_id: str
    published_validation: str | None = None
    max_drop: float = 0.01
    target_recall: float = 0.95
    keep: int = 3
    shards: int | None = None  # None: the published version's number of shards (1 if none)
    index_type: str = "auto"
    index_kind: str | None = None  # None: the published version's kind (centroids if none)
    gate_k: int = 100
    batch_size: int = 65536
    max_error_fraction: float = 0.05
    max_shrink: float = 0.1
    kill_after: str | None = None

    def check(self) -> ReindexConfig:
        for name in ("work", "index_root"):
            value = str(getattr(self, name))
            if "://" in value and not value.startswith("file://"):
                raise ValueError(f"--{name.replace('_', '-')} must be a local or mounted directory "
                                 f"(locks, atomic renames), got {value}")
        if self.index_kind is not None and self.index_kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {self.index_kind!r}")
        if self.keep < 1:
            raise ValueError(f"--keep must be >= 1, got {self.keep}")
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        if not 0 <= self.max_drop <= 1:
            raise ValueError(f"--max-drop must be in [0, 1], got {self.max_drop}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"--target-recall must be in (0, 1], got {self.target_recall}")
        if not 0 <= self.max_shrink <= 1:
            raise ValueError(f"--max-shrink must be in [0, 1], got {self.max_shrink}")
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"--max-error-fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.gate_k < 1:
            raise ValueError(f"--gate-k must be >= 1, got {self.gate_k}")
        if self.kill_after is not None and self.kill_after not in STEPS:
            raise ValueError(f"kill_after must be one of {', '.join(STEPS)}")
        return self

    def build_key(self, shards: int | None = None, index_kind: str | None = None) -> dict:
        """Options whose change requires a rebuild even when no image changed (shards and kind as
        resolved by `resolve_layout`)."""
        return {"index_kind": index_kind or self.index_kind, "shards": shards or self.shards,
                "index_type": self.index_type, "target_recall": self.target_recall}


def resolve_layout(cfg: ReindexConfig, published: dict | None) -> tuple[int, str]:
    """(shards, index kind) of the next version: what the options say, else what the published
    version's manifest has (a nightly run must not silently re-shape a 4-shard centroid index
    into a 1-shard one, nor turn it into an image-embeddings index), else 1 shard of centroids."""
    published = published or {}
    shards = cfg.shards or int(published.get("num_shards") or 1)
    kind = cfg.index_kind or str(published.get("vector_kind") or "centroids")
    if kind not in INDEX_KINDS:
        raise ReindexError(f"published version holds {kind!r} vectors; pass --index-kind "
                           f"({', '.join(INDEX_KINDS)})")
    return shards, kind


# embed(previous embeddings dir or None, output dir) -> summary with at least "embedded",
# "carried", "errors", "rows" (pipelines/embed.py's _embed.json)
EmbedFn = Callable[[str | None, str], dict]


@dataclass
class RunSummary:
    run_id: str
    generation: int
    status: str  # "published" | "up-to-date" | "refused"
    embedded: int = 0
    carried: int = 0
    errors: int = 0
    images: int = 0
    added: int = 0
    removed: int = 0
    touched_items: int = 0
    items: int = 0
    version: str | None = None
    published: str | None = None
    reason: str = ""
    pruned: list = field(default_factory=list)
    seconds: float = 0.0


def gen_name(g: int) -> str:
    return f"gen-{g:06d}"


class Reindexer:
    """Runs the steps of one nightly re-index (see the module docstring)."""

    def __init__(self, cfg: ReindexConfig, embed: EmbedFn, say: Callable[[str], None] = print):
        self.cfg = cfg.check()
        self.embed = embed
        self.say = say
        self.work = os.path.abspath(cfg.work.removeprefix("file://"))
        self.home = IndexHome.of(cfg.index_root, cfg.name)
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        self.log = RunLog(os.path.join(self.work, LOG_FILE), self.run_id)

    # --- paths and state ---
    def path(self, rel: str | None) -> str | None:
        return None if rel is None else os.path.join(self.work, rel)

    @property
    def state_path(self) -> str:
        return os.path.join(self.work, STATE_FILE)

    @property
    def pending_path(self) -> str:
        return os.path.join(self.work, PENDING_FILE)

    def state(self) -> dict:
        return read_json(self.state_path) or {"format": 1, "generation": 0, "gate": {}}

    def _step_done(self, step: str, t0: float, **fields) -> None:
        self.log.write(step, "done", seconds=round(time.perf_counter() - t0, 3), **fields)
        if self.cfg.kill_after == step:  # crash tests: die here as a power cut would
            os.kill(os.getpid(), signal.SIGKILL)

    # --- recovery of a killed run ---
    def recover(self, state: dict) -> dict:
        """Finish or clean up after a run that was killed. Returns the (maybe new) state."""
        pending = read_json(self.pending_path)
        if pending is None:
            return state
        ver = pending.get("version")
        current = self.home.current()
        if pending.get("generation", 0) <= state.get("generation", 0):
            pass  # killed after its commit: nothing left to do
        elif ver is not None and current == ver and pending.get("commit") is not None:
            # killed between publishing and committing: the published version is complete and
            # its generation's files were complete before it was built -> commit it now
            state = pending["commit"]
            write_json_atomic(self.state_path, state)
            self.log.write("recover", "committed", generation=state["generation"], version=ver)
            self.say(f"reindex: recovered a run killed after publishing {ver}: committed it")
        elif ver is not None and ver != current and ver != state.get("published_version"):
            with self.home.lock():  # no publish may name it while it is removed
                if self.home.current() != ver:
                    for entry in os.listdir(self.home.path) if os.path.isdir(self.home.path) else []:
                        if entry == ver or entry.startswith(f".tmp-{ver}-"):
                            remove_tree(os.path.join(self.home.path, entry))
                            self.log.write("recover", "removed", path=entry)
                            self.say(f"reindex: removed {entry}, left unpublished by a killed run")
        os.remove(self.pending_path)
        return state

    def embed_cache(self, state: dict) -> str | None:
        """The newest complete embeddings output made by this run's model to carry rows from
        (a killed or refused run's rows are as good a cache as the committed ones), else the
        newest one at all (embed then carries nothing), else None."""
        newest = same_model = None
        for entry in sorted(os.listdir(self.work)):
            p = os.path.join(self.work, entry, "embeddings")
            summary = read_json(os.path.join(p, "_embed.json")) if entry.startswith("gen-") else None
            if summary is not None:
                newest = p
                if summary.get("model") == self.cfg.model_id:
                    same_model = p
        return same_model or newest or self.path(state.get("embeddings"))

    def collect_garbage(self, state: dict) -> list[str]:
        """Remove generation dirs other than the committed one and the published one's."""
        keep = {os.path.dirname(state[k]) for k in ("embeddings", "published_embeddings") if state.get(k)}
        removed = []
        for entry in os.listdir(self.work):
            p = os.path.join(self.work, entry)
            if (entry.startswith("gen-") and entry not in keep) or (entry.startswith(".tmp-") and os.path.isdir(p)):
                remove_tree(p)
                removed.append(entry)
        return removed

    # --- the run ---
    def run(self) -> RunSummary:
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(self.home.path, exist_ok=True)
        t_run = time.perf_counter()
        with reindex_locks(self.work, self.home):
            try:
                summary = self._run_locked(t_run)
            except GateRefused:
                raise
            except BaseException as e:
                self.log.write("run", "failed", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                               seconds=round(time.perf_counter() - t_run, 3))
                raise
        return summary

    def _run_locked(self, t_run: float) -> RunSummary:
        cfg = self.cfg
        validation = read_vectors(cfg.validation, kind="embeddings")
        if validation.meta.model != cfg.model_id:
            raise ReindexError(f"validation queries {cfg.validation} come from model {validation.meta.model}, "
                               f"but the run uses model {cfg.model_id}: embed them with the same model")
        state = self.recover(self.state())
        # past every generation dir on disk: a killed run's dir may be the embed cache
        existing = [int(e[4:]) for e in os.listdir(self.work) if e.startswith("gen-") and e[4:].isdigit()]
        g = max([state.get("generation", 0), *existing]) + 1
        gdir = os.path.join(self.work, gen_name(g))
        version = new_version_name()
        pending = {"generation": g, "version": version, "run": self.run_id, "started": _now()}
        write_json_atomic(self.pending_path, pending)
        self.log.write("run", "start", generation=g, model=cfg.model_id, work=self.work,
                       index=self.home.path, config=asdict(cfg))
        self.say(f"reindex: run {self.run_id}, generation {g}, model {cfg.model_id}")
        summary = RunSummary(self.run_id, g, "running")

        # 1. embed new / changed images (carry the rest)
        t = time.perf_counter()
        cache = self.embed_cache(state)
        emb_dir = os.path.join(gdir, "embeddings")
        os.makedirs(gdir, exist_ok=True)
        emb = self.embed(cache, emb_dir)
        meta = check_schema(open_dataset(emb_dir).schema, "embeddings", emb_dir)
        if meta.model != cfg.model_id:
            raise ReindexError(f"embed wrote model {meta.model}, expected {cfg.model_id}")
        ids = open_dataset(emb_dir).to_table(columns=["image_id"]).column("image_id")
        n_rows, n_unique = len(ids), pc.count_distinct(ids).as_py()
        if n_rows != n_unique:
            raise ReindexError(f"{emb_dir}: {n_rows} rows for {n_unique} image ids (duplicates)")
        summary.embedded, summary.carried = int(emb.get("embedded", 0)), int(emb.get("carried", 0))
        summary.errors, summary.images = int(emb.get("errors", 0)), n_rows
        self.say(f"reindex: embed: {summary.embedded} embedded, {summary.carried} carried, "
                 f"{summary.errors} error(s), {n_rows} images")
        # unreadable images silently leave the gallery: many of them means broken storage or
        # data, not a gallery change, and must not be published
        if summary.errors > cfg.max_error_fraction * (n_rows + summary.errors):
            self.log.write("embed", "failed", errors=summary.errors, images=n_rows)
            raise ReindexError(f"{summary.errors} of {n_rows + summary.errors} gallery images could not be "
                               f"embedded (more than --max-error-fraction {cfg.max_error_fraction}); "
                               f"see {os.path.join(emb_dir, '_errors.parquet')}")
        self._step_done("embed", t, embedded=summary.embedded, carried=summary.carried,
                        errors=summary.errors, images=n_rows, cache=cache)

        # 2. centroids of the touched items
        t = time.perf_counter()
        cent_dir = os.path.join(gdir, "centroids")
        old_emb, old_cent = self.path(state.get("embeddings")), self.path(state.get("centroids"))
        if old_emb and state.get("model") == cfg.model_id and os.path.isdir(old_emb) and old_cent:
            delta = diff_embeddings(old_emb, emb_dir, cfg.batch_size)
            summary.added, summary.removed = delta.n_added, delta.n_removed
            stats = update_centroids(old_cent, delta, cent_dir, cfg.model_id, meta.dim, cfg.batch_size)
        else:
            stats = compute_centroids(emb_dir, cent_dir, cfg.batch_size)
            summary.added, summary.removed = n_rows, int(state.get("images", 0))
        if stats.images != n_rows:
            raise ReindexError(f"centroids count {stats.images} images but the embeddings hold {n_rows}")
        summary.touched_items, summary.items = stats.touched_items, stats.items
        self.say(f"reindex: centroids ({stats.mode}): +{summary.added} -{summary.removed} rows, "
                 f"{stats.touched_items} item(s) touched, {stats.items} items")
        self._step_done("centroids", t, mode=stats.mode, added=summary.added, removed=summary.removed,
                        touched_items=stats.touched_items, items=stats.items, pairs=stats.pairs)

        published = self.home.current()
        shards, kind = resolve_layout(cfg, self.home.manifest(published) if published else None)
        base = {"format": 1, "generation": g, "model": cfg.model_id, "dim": meta.dim,
                "embeddings": os.path.relpath(emb_dir, self.work),
                "centroids": os.path.relpath(cent_dir, self.work),
                "images": n_rows, "items": stats.items, "build_key": cfg.build_key(shards, kind),
                "gate": state.get("gate", {}),
                "published_version": state.get("published_version"),
                "published_embeddings": state.get("published_embeddings"),
                "published_generation": state.get("published_generation"),
                "committed_at": None, "run": self.run_id}
        current = self.home.current()
        # up to date: same rows and model as the committed generation, and that generation is
        # the one published (not one whose version the gate refused)
        unchanged = (summary.added == 0 and summary.removed == 0 and state.get("model") == cfg.model_id
                     and state.get("generation", 0) > 0
                     and state.get("published_generation") == state.get("generation")
                     and current is not None and current == state.get("published_version")
                     and state.get("build_key") == cfg.build_key(shards, kind))
        if unchanged:
            base.update(published_version=current, published_embeddings=base["embeddings"],
                        published_generation=g, committed_at=_now())
            self.commit(base)
            summary.status, summary.published = "up-to-date", current
            summary.reason = f"no gallery change; {current} stays published"
            self.say(f"reindex: {summary.reason}")
            self.log.write("build", "skipped", reason="no change")
            return self._finish(summary, base, t_run)

        # 3. build a new version (not published)
        t = time.perf_counter()
        from index.ann.build import BuildConfig, build_index

        vectors = os.path.join(cent_dir, CENTROIDS_FILE) if kind == "centroids" else emb_dir
        bcfg = BuildConfig(shards=shards, index_type=cfg.index_type, target_recall=cfg.target_recall)
        built = build_index(vectors, cfg.index_root, cfg.name, bcfg, publish=False,
                            version=version, progress=lambda m: self.say(f"reindex: build: {m}"))
        summary.version = version
        recall = version_recall(built.manifest)
        self._step_done("build", t, version=version, vectors=built.manifest["num_vectors"],
                        index_type=built.manifest["index_type"], recall=recall)

        # 4. gate against the published version
        t = time.perf_counter()
        decision = self.gate(version, emb_dir, validation, recall, state, current)
        self.say(f"reindex: gate: {'passed' if decision.passed else 'REFUSED'}: {decision.reason}")
        self._step_done("gate", t, passed=decision.passed, reason=decision.reason,
                        new_mAP=decision.new["mAP"], old_mAP=None if decision.old is None else decision.old["mAP"],
                        recall=recall)
        if not decision.passed:
            with self.home.lock():
                remove_tree(self.home.version_dir(version))
            base["committed_at"] = _now()
            self.commit(base)
            summary.status, summary.published, summary.reason = "refused", current, decision.reason
            self._finish(summary, base, t_run)
            raise GateRefused(f"gate refused version {version}: {decision.reason}; "
                              f"{current or 'nothing'} stays published")

        # 5. publish, 6. commit, 7. prune
        gate = dict(base["gate"])
        gate[version] = {k: decision.new[k] for k in ("mAP", "mINP", "num_valid_queries", "num_queries", "k",
                                                      "model", "gate_mAP", "scoring", "num_vectors")}
        gate = dict(list(gate.items())[-GATE_HISTORY:])
        base.update(published_version=version, published_embeddings=base["embeddings"],
                    published_generation=g, gate=gate)
        pending["commit"] = {**base, "committed_at": _now()}
        write_json_atomic(self.pending_path, pending)
        t = time.perf_counter()
        self.home.publish(version)
        self.say(f"reindex: published {version} ({built.manifest['num_vectors']} vectors)")
        self._step_done("publish", t, version=version, previous=current)
        t = time.perf_counter()
        self.commit(pending["commit"])
        self._step_done("commit", t, generation=g)
        summary.status, summary.published, summary.reason = "published", version, decision.reason
        return self._finish(summary, pending["commit"], t_run)

    def gate(self, version: str, emb_dir: str, validation: VectorTable, recall: float | None,
             state: dict, current: str | None) -> GateDecision:
        """Evaluate the new version and the published one (see gate_decision)."""
        cfg = self.cfg
        new_labels = gallery_labels(emb_dir)
        old_report = None
        # one list length for both versions, never capped by either gallery's size (a capped k
        # made a shrunken gallery's mAP@3 look perfect next to the full one's mAP@22)
        k = cfg.gate_k
        if current is not None:
            cur_manifest = self.home.manifest(current)
            cur_model = str(cur_manifest.get("model"))
            pub_emb = self.path(state.get("published_embeddings"))
            if state.get("published_version") == current and pub_emb and os.path.isdir(pub_emb):
                old_labels = gallery_labels(pub_emb)
            else:  # published by something else: labels from its ids tables, no cameras
                old_labels = index_labels(self.home, current)
            use_cams = old_labels.cams is not None and new_labels.cams is not None
            if cur_model == validation.meta.model:
                old_report = evaluate_version(self.home, current, validation, old_labels, k, use_cams)
            elif cfg.published_validation:
                pv = read_vectors(cfg.published_validation, kind="embeddings")
                if pv.meta.model != cur_model:
                    raise ReindexError(f"--published-validation comes from model {pv.meta.model}, but the "
                                       f"published version {current} from model {cur_model}")
                old_report = evaluate_version(self.home, current, pv, old_labels, k, use_cams)
            elif current in state.get("gate", {}):
                old_report = {**state["gate"][current], "version": current, "recorded": True,
                              "num_vectors": cur_manifest.get("num_vectors")}
            else:
                raise ReindexError(
                    f"cannot compare with published version {current}: it was built by model {cur_model} and the "
                    f"validation queries come from model {validation.meta.model}; pass --published-validation "
                    f"with query embeddings of model {cur_model}")
        else:
            use_cams = new_labels.cams is not None
        new_report = evaluate_version(self.home, version, validation, new_labels, k, use_cams)
        return gate_decision(new_report, old_report, recall, cfg.target_recall, cfg.max_drop, cfg.max_shrink)

    def commit(self, state: dict) -> None:
        write_json_atomic(self.state_path, state)

    def _finish(self, summary: RunSummary, state: dict, t_run: float) -> RunSummary:
        t = time.perf_counter()
        summary.pruned = self.home.prune(self.cfg.keep) if self.home.current() else []
        removed = self.collect_garbage(state)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.pending_path)
        self._step_done("prune", t, pruned=summary.pruned, removed_work=removed)
        summary.seconds = round(time.perf_counter() - t_run, 3)
        self.log.write("run", summary.status, **{k: v for k, v in asdict(summary).items() if k not in ("run_id", "status")})
        return summary
