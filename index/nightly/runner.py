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

One method per step (`Reindexer._embed_step` ... `_publish_step`). The work-dir files and locks
live in index.nightly.state, the gate in index.nightly.gate, the incremental centroids in
index.centroids.incremental.

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
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow.compute as pc

from contracts.vectors import VectorTable, check_schema, open_dataset, read_vectors
from index.ann.versions import IndexHome, new_version_name
from index.centroids.incremental import (
    CENTROIDS_FILE,
    CentroidStateError,
    compute_centroids,
    diff_embeddings,
    update_centroids,
)
from index.nightly.gate import (
    GateDecision,
    evaluate_version,
    gallery_labels,
    gate_decision,
    index_labels,
    version_recall,
)
from index.nightly.state import (
    LOG_FILE,
    PENDING_FILE,
    STATE_FILE,
    ReindexError,
    RunLog,
    now,
    read_json,
    reindex_locks,
    remove_tree,
    write_json_atomic,
)

__all__ = [
    "GATE_HISTORY",
    "INDEX_KINDS",
    "STEPS",
    "EmbedFn",
    "GateRefused",
    "ReindexConfig",
    "Reindexer",
    "RunSummary",
    "gen_name",
    "resolve_layout",
]

STEPS = ("embed", "centroids", "build", "gate", "publish", "commit", "prune")
INDEX_KINDS = ("centroids", "embeddings")
GATE_HISTORY = 50  # validation reports kept in state.json (published versions only)


class GateRefused(ReindexError):
    """The new version is worse than the published one (or misses the recall target)."""


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
    model_dir: str | None = None  # recorded in each version's manifest (image search, serving)
    rerank_graph: int = 0  # neighbours per vector stored for k-reciprocal at query time; 0 = none

    def __post_init__(self) -> None:
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
        if self.rerank_graph < 0:
            raise ValueError(f"--rerank-graph must be >= 0 (0 = none), got {self.rerank_graph}")
        if self.gate_k < 1:
            raise ValueError(f"--gate-k must be >= 1, got {self.gate_k}")
        if self.kill_after is not None and self.kill_after not in STEPS:
            raise ValueError(f"kill_after must be one of {', '.join(STEPS)}")

    def build_key(self, shards: int | None = None, index_kind: str | None = None) -> dict:
        """Options whose change requires a rebuild even when no image changed (shards and kind as
        resolved by `resolve_layout`)."""
        return {"index_kind": index_kind or self.index_kind, "shards": shards or self.shards,
                "index_type": self.index_type, "target_recall": self.target_recall,
                **({"rerank_graph": self.rerank_graph} if self.rerank_graph else {})}


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


@dataclass
class _Run:
    """What one run's steps hand each other (filled in step by step)."""

    validation: VectorTable
    state: dict  # the committed state (after recovery)
    generation: int
    version: str  # the reserved name of the version this run builds
    pending: dict
    summary: RunSummary
    emb_dir: str
    cent_dir: str
    dim: int = 0
    current: str | None = None  # the published version when the run started building
    shards: int = 1
    kind: str = "centroids"
    base: dict = field(default_factory=dict)  # the state this generation commits
    manifest: dict = field(default_factory=dict)  # the built version's manifest
    recall: float | None = None


def gen_name(g: int) -> str:
    return f"gen-{g:06d}"


class Reindexer:
    """Runs the steps of one nightly re-index (see the module docstring)."""

    def __init__(self, cfg: ReindexConfig, embed: EmbedFn, say: Callable[[str], None] = print):
        self.cfg = cfg
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
        run = self._start()
        self._embed_step(run)
        self._centroids_step(run)
        if self._up_to_date(run):
            return self._finish(run.summary, run.base, t_run)
        self._build_step(run)
        decision = self._gate_step(run)
        if not decision.passed:
            self._refuse(run, decision, t_run)  # raises GateRefused
        return self._publish_step(run, decision, t_run)

    def _start(self) -> _Run:
        """Check the validation queries' model, recover a killed run, reserve the generation and
        the version name (pending.json)."""
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
        pending = {"generation": g, "version": version, "run": self.run_id, "started": now()}
        write_json_atomic(self.pending_path, pending)
        self.log.write("run", "start", generation=g, model=cfg.model_id, work=self.work,
                       index=self.home.path, config=asdict(cfg))
        self.say(f"reindex: run {self.run_id}, generation {g}, model {cfg.model_id}")
        return _Run(validation=validation, state=state, generation=g, version=version, pending=pending,
                    summary=RunSummary(self.run_id, g, "running"),
                    emb_dir=os.path.join(gdir, "embeddings"), cent_dir=os.path.join(gdir, "centroids"))

    def _embed_step(self, run: _Run) -> None:
        """1. embed new / changed images (carry the rest); check the output's model and ids."""
        cfg, summary, emb_dir = self.cfg, run.summary, run.emb_dir
        t = time.perf_counter()
        cache = self.embed_cache(run.state)
        os.makedirs(os.path.dirname(emb_dir), exist_ok=True)
        emb = self.embed(cache, emb_dir)
        meta = check_schema(open_dataset(emb_dir).schema, "embeddings", emb_dir)
        if meta.model != cfg.model_id:
            raise ReindexError(f"embed wrote model {meta.model}, expected {cfg.model_id}")
        ids = open_dataset(emb_dir).to_table(columns=["image_id"]).column("image_id")
        n_rows, n_unique = len(ids), pc.count_distinct(ids).as_py()
        if n_rows != n_unique:
            raise ReindexError(f"{emb_dir}: {n_rows} rows for {n_unique} image ids (duplicates)")
        run.dim = meta.dim
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

    def _centroids_step(self, run: _Run) -> None:
        """2. centroids of the touched items (everything on a model change or a first run), then
        the state this generation commits (run.base)."""
        cfg, summary, state, n_rows = self.cfg, run.summary, run.state, run.summary.images
        t = time.perf_counter()
        old_emb, old_cent = self.path(state.get("embeddings")), self.path(state.get("centroids"))
        try:
            if old_emb and state.get("model") == cfg.model_id and os.path.isdir(old_emb) and old_cent:
                delta = diff_embeddings(old_emb, run.emb_dir, cfg.batch_size)
                summary.added, summary.removed = delta.n_added, delta.n_removed
                stats = update_centroids(old_cent, delta, run.cent_dir, cfg.model_id, run.dim, cfg.batch_size)
            else:
                stats = compute_centroids(run.emb_dir, run.cent_dir, cfg.batch_size)
                summary.added, summary.removed = n_rows, int(state.get("images", 0))
        except CentroidStateError as e:
            raise ReindexError(str(e)) from None
        if stats.images != n_rows:
            raise ReindexError(f"centroids count {stats.images} images but the embeddings hold {n_rows}")
        summary.touched_items, summary.items = stats.touched_items, stats.items
        self.say(f"reindex: centroids ({stats.mode}): +{summary.added} -{summary.removed} rows, "
                 f"{stats.touched_items} item(s) touched, {stats.items} items")
        self._step_done("centroids", t, mode=stats.mode, added=summary.added, removed=summary.removed,
                        touched_items=stats.touched_items, items=stats.items, pairs=stats.pairs)
        run.current = self.home.current()
        run.shards, run.kind = resolve_layout(cfg, self.home.manifest(run.current) if run.current else None)
        run.base = {"format": 1, "generation": run.generation, "model": cfg.model_id, "dim": run.dim,
                    "embeddings": os.path.relpath(run.emb_dir, self.work),
                    "centroids": os.path.relpath(run.cent_dir, self.work),
                    "images": n_rows, "items": stats.items, "build_key": cfg.build_key(run.shards, run.kind),
                    "gate": state.get("gate", {}),
                    "published_version": state.get("published_version"),
                    "published_embeddings": state.get("published_embeddings"),
                    "published_generation": state.get("published_generation"),
                    "committed_at": None, "run": self.run_id}

    def _up_to_date(self, run: _Run) -> bool:
        """Same rows and model as the committed generation, and that generation is the one
        published (not one whose version the gate refused): commit it, build nothing."""
        cfg, state, summary, current = self.cfg, run.state, run.summary, run.current
        unchanged = (summary.added == 0 and summary.removed == 0 and state.get("model") == cfg.model_id
                     and state.get("generation", 0) > 0
                     and state.get("published_generation") == state.get("generation")
                     and current is not None and current == state.get("published_version")
                     and state.get("build_key") == cfg.build_key(run.shards, run.kind))
        if not unchanged:
            return False
        run.base.update(published_version=current, published_embeddings=run.base["embeddings"],
                        published_generation=run.generation, committed_at=now())
        self.commit(run.base)
        summary.status, summary.published = "up-to-date", current
        summary.reason = f"no gallery change; {current} stays published"
        self.say(f"reindex: {summary.reason}")
        self.log.write("build", "skipped", reason="no change")
        return True

    def _build_step(self, run: _Run) -> None:
        """3. build a new version (not published)."""
        from index.ann.build import BuildConfig, build_index  # faiss: only when a run builds

        cfg = self.cfg
        t = time.perf_counter()
        vectors = os.path.join(run.cent_dir, CENTROIDS_FILE) if run.kind == "centroids" else run.emb_dir
        bcfg = BuildConfig(shards=run.shards, index_type=cfg.index_type, target_recall=cfg.target_recall,
                           rerank_graph=cfg.rerank_graph)
        built = build_index(vectors, cfg.index_root, cfg.name, bcfg, publish=False,
                            version=run.version, progress=lambda m: self.say(f"reindex: build: {m}"),
                            model_dir=cfg.model_dir)
        run.summary.version = run.version
        run.manifest = built.manifest
        run.recall = version_recall(built.manifest)
        self._step_done("build", t, version=run.version, vectors=built.manifest["num_vectors"],
                        index_type=built.manifest["index_type"], recall=run.recall)

    def _gate_step(self, run: _Run) -> GateDecision:
        """4. gate against the published version."""
        t = time.perf_counter()
        decision = self.gate(run.version, run.emb_dir, run.validation, run.recall, run.state, run.current)
        self.say(f"reindex: gate: {'passed' if decision.passed else 'REFUSED'}: {decision.reason}")
        self._step_done("gate", t, passed=decision.passed, reason=decision.reason,
                        new_mAP=decision.new["mAP"], old_mAP=None if decision.old is None else decision.old["mAP"],
                        recall=run.recall)
        return decision

    def _refuse(self, run: _Run, decision: GateDecision, t_run: float) -> None:
        """The gate refused: remove the new version, commit the generation (its rows are the
        next run's cache), keep the published one, raise GateRefused."""
        with self.home.lock():
            remove_tree(self.home.version_dir(run.version))
        run.base["committed_at"] = now()
        self.commit(run.base)
        summary = run.summary
        summary.status, summary.published, summary.reason = "refused", run.current, decision.reason
        self._finish(summary, run.base, t_run)
        raise GateRefused(f"gate refused version {run.version}: {decision.reason}; "
                          f"{run.current or 'nothing'} stays published")

    def _publish_step(self, run: _Run, decision: GateDecision, t_run: float) -> RunSummary:
        """5. publish (the commit is in pending.json first, so a kill right after publishing is
        committed by the next run), 6. commit, 7. prune."""
        base, pending, version = run.base, run.pending, run.version
        gate = dict(base["gate"])
        gate[version] = {k: decision.new[k] for k in ("mAP", "mINP", "num_valid_queries", "num_queries", "k",
                                                      "model", "gate_mAP", "scoring", "num_vectors")}
        gate = dict(list(gate.items())[-GATE_HISTORY:])
        base.update(published_version=version, published_embeddings=base["embeddings"],
                    published_generation=run.generation, gate=gate)
        pending["commit"] = {**base, "committed_at": now()}
        write_json_atomic(self.pending_path, pending)
        t = time.perf_counter()
        self.home.publish(version)
        self.say(f"reindex: published {version} ({run.manifest['num_vectors']} vectors)")
        self._step_done("publish", t, version=version, previous=run.current)
        t = time.perf_counter()
        self.commit(pending["commit"])
        self._step_done("commit", t, generation=run.generation)
        summary = run.summary
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
