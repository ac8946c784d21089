"""pipelines/reindex.py and index/nightly/: the nightly job on a tiny synthetic dataset and an
untrained resnet18 at 32x16 (embedding in-process, --executor local), plus one slow test that
submits the job three times to a private local Ray head through `ray job submit`.

Checked: the second run embeds nothing and publishes nothing new; adding 20 images and removing
5 embeds exactly 20 and the index holds the right items with the same centroids a full
recompute gives; the gate refuses a degraded gallery and a collapsed model and keeps the
published version; the lock; SIGKILL after a step, then a re-run, ends with one row per image
and CURRENT naming a complete version.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from index.ann.versions import IndexHome
from index.centroids import aggregate as C
from index.centroids import incremental
from index.nightly import gate as G
from index.nightly import state as S

REPO = Path(__file__).resolve().parents[2]
HELD_BACK = 20  # gallery images kept out of the first manifest, added on the third night
REMOVED = 5


# ---------------------------------------------------------------- fixtures


def _save_model(path: Path, seed: int = 0, collapse: bool = False) -> str:
    import torch

    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    net = build_model(cfg).eval()
    if collapse:  # every image gets the same embedding: a model that learned nothing useful
        with torch.no_grad():
            for p in net.backbone.parameters():
                p.zero_()
            net.bottleneck.bias.copy_(torch.randn(cfg.embedding_dim))
    return save_model(net, cfg, str(path))


def _write_manifest(table: pa.Table, path: Path) -> Path:
    from contracts.manifest import write_manifest

    write_manifest(table, str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic Market-layout data, its manifest, a tiny model and its validation queries."""
    from contracts.manifest import read_manifest
    from pipelines import make_shards, make_synthetic
    from pipelines.reindex import embed_local

    base = tmp_path_factory.mktemp("reindex")
    data, shards = base / "data", base / "shards"
    assert make_synthetic.main(["--items", "22", "--images-per-item", "5", "--cameras", "3", "--size", "32x16",
                                "--train-fraction", "0.2", "--workers", "1", "--out", str(data)]) == 0
    assert make_shards.main(["--format", "market1501", "--root", str(data), "--out", str(shards)]) == 0
    manifest = read_manifest(shards / "manifest.parquet")
    gallery = manifest.filter(pc.equal(manifest.column("split"), "gallery"))
    queries = manifest.filter(pc.equal(manifest.column("split"), "query"))
    model = base / "model"
    model_id = _save_model(model)
    val = base / "val"
    embed_local(queries, str(data), str(model), None, str(val))
    return {"base": base, "data": data, "gallery": gallery, "queries": queries, "model": model,
            "model_id": model_id, "val": val}


def night(tmp: Path, rows: pa.Table, name: str) -> Path:
    """One night's gallery manifest."""
    return _write_manifest(rows, tmp / f"{name}.parquet")


def argv(world, manifest: Path, tmp: Path, *extra, model=None, val=None) -> list[str]:
    return ["--gallery-manifest", str(manifest), "--root", str(world["data"]),
            "--model", str(model or world["model"]), "--work", str(tmp / "work"),
            "--index-root", str(tmp / "indexes"), "--name", "gallery",
            "--validation", str(val or world["val"]), "--executor", "local", *extra]


# New items make any gallery harder (more candidates per query), so nights that add items are
# run with a gate that tolerates that; the gate itself is tested on its own below.
GROWTH = ("--max-drop", "1.0")


def last_run(work: Path) -> dict:
    """step -> last event of the newest run in the run log ("run" is its final status)."""
    events = S.read_log(str(work / S.LOG_FILE))
    run = events[-1]["run"]
    return {e["step"]: e for e in events if e["run"] == run}


def committed_image_ids(work: Path) -> list[str]:
    state = json.loads((work / S.STATE_FILE).read_text())
    from contracts.vectors import open_dataset

    ids = open_dataset(str(work / state["embeddings"])).to_table(columns=["image_id"]).column("image_id")
    return ids.to_pylist()


# ---------------------------------------------------------------- the nightly runs


def test_three_nights_incremental(world, tmp_path):
    from contracts.vectors import read_vectors
    from index.ann.search import open_index
    from pipelines.reindex import main

    g = world["gallery"]
    n = g.num_rows
    first = g.slice(0, n - HELD_BACK)
    m1 = night(tmp_path, first, "night1")
    assert main(argv(world, m1, tmp_path)) == 0
    work, home = tmp_path / "work", IndexHome.of(str(tmp_path / "indexes"), "gallery")
    s1 = last_run(work)
    assert s1["embed"]["embedded"] == first.num_rows and s1["embed"]["carried"] == 0
    assert s1["run"]["status"] == "published" and s1["gate"]["passed"]
    v1 = home.current()
    assert v1 is not None and home.list_versions() == [v1]
    for step in ("embed", "centroids", "build", "gate", "publish", "commit", "prune"):
        assert s1[step]["status"] == "done" and s1[step]["seconds"] >= 0

    # night 2: nothing changed -> 0 embedded, no new version
    assert main(argv(world, m1, tmp_path)) == 0
    s2 = last_run(work)
    assert s2["embed"]["embedded"] == 0 and s2["embed"]["carried"] == first.num_rows
    assert s2["run"]["status"] == "up-to-date"
    assert home.current() == v1 and home.list_versions() == [v1]

    # night 3: 20 new images, 5 removed (spread over items) -> exactly 20 embedded
    removed = set(first.column("image_id").to_pylist()[3::11][:REMOVED])
    assert len(removed) == REMOVED
    keep = pc.invert(pc.is_in(first.column("image_id"), value_set=pa.array(sorted(removed))))
    third = pa.concat_tables([first.filter(keep), g.slice(n - HELD_BACK)])
    m3 = night(tmp_path, third, "night3")
    assert main(argv(world, m3, tmp_path, *GROWTH, "--keep", "1")) == 0
    s3 = last_run(work)
    assert s3["embed"]["embedded"] == HELD_BACK
    assert s3["embed"]["carried"] == first.num_rows - REMOVED
    assert s3["centroids"]["mode"] == "incremental"
    assert (s3["centroids"]["added"], s3["centroids"]["removed"]) == (HELD_BACK, REMOVED)
    touched = set(g.slice(n - HELD_BACK).column("item_id").to_pylist()) | set(
        first.filter(pc.invert(keep)).column("item_id").to_pylist())
    assert s3["centroids"]["touched_items"] == len(touched)
    v3 = home.current()
    assert v3 != v1 and s3["run"]["status"] == "published"
    assert home.list_versions() == [v3] and s3["prune"]["pruned"] == [v1]  # --keep 1

    # one embeddings row per gallery image, the index holds exactly the gallery's items
    ids = committed_image_ids(work)
    assert sorted(ids) == sorted(third.column("image_id").to_pylist())
    items = set(third.column("item_id").to_pylist())
    with open_index(home.path, verify=True) as idx:
        assert len(idx) == idx.ntotal == len(items) == s3["centroids"]["items"]
        assert set(idx._labels.column("item_id").to_pylist()) == items
    # the incrementally updated centroids equal a full recompute from the embeddings
    state = json.loads((work / S.STATE_FILE).read_text())
    emb = read_vectors(str(work / state["embeddings"]), kind="embeddings")
    ref = C.centroids_reference(emb.item_ids, emb.camera_ids, emb.vectors)
    got = read_vectors(str(work / state["centroids"] / incremental.CENTROIDS_FILE), kind="centroids")
    order = np.argsort(got.item_ids.astype(str))
    assert list(got.item_ids[order]) == list(ref.item_ids)
    assert np.abs(got.vectors[order] - ref.embeddings).max() < 1e-6
    counts = got.table.column("count").to_numpy()[order]
    assert counts.sum() == third.num_rows and (counts == ref.counts).all()
    # the index answers with those centroids: each centroid's nearest item is itself
    with open_index(home.path) as idx:
        hits = idx.search(ref.embeddings, 1)
        assert list(hits.item_ids[:, 0]) == list(ref.item_ids)
    # work dir holds only the committed generation; no temporary leftovers anywhere
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(("gen-", ".tmp"))) == [
        Path(state["embeddings"]).parent.name]
    assert not [p for p in Path(home.path).iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------- the gate


def test_gate_refuses_a_degraded_gallery(world, tmp_path, capsys):
    from pipelines._cli import run_main
    from pipelines.reindex import main

    g = world["gallery"]
    m1 = night(tmp_path, g, "good")
    assert main(argv(world, m1, tmp_path)) == 0
    home = IndexHome.of(str(tmp_path / "indexes"), "gallery")
    v1 = home.current()
    # the next night's labels are scrambled: every image moves to another item
    items = np.asarray(g.column("item_id").to_pylist(), dtype=object)
    bad = g.set_column(g.schema.get_field_index("item_id"), "item_id",
                       pa.array(np.roll(items, 7).tolist(), pa.string()))
    m2 = night(tmp_path, bad, "bad")
    with pytest.raises(SystemExit) as e:
        run_main(main, argv(world, m2, tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: gate refused") and "mAP" in err[0]
    assert v1 in err[0]  # names the version that stays published
    assert home.current() == v1 and home.list_versions() == [v1]  # refused version removed
    home.verify()
    s = last_run(tmp_path / "work")
    assert s["gate"]["passed"] is False and s["gate"]["new_mAP"] < s["gate"]["old_mAP"] - 0.01
    assert s["run"]["status"] == "refused"
    # with a looser gate the same night is accepted
    assert main(argv(world, m2, tmp_path, "--max-drop", "1.0")) == 0
    assert home.current() not in (None, v1)


def test_gate_refuses_a_worse_model_and_checks_validation_model(world, tmp_path, capsys):
    from pipelines._cli import run_main
    from pipelines.reindex import embed_local, main

    m1 = night(tmp_path, world["gallery"], "g")
    assert main(argv(world, m1, tmp_path)) == 0
    home = IndexHome.of(str(tmp_path / "indexes"), "gallery")
    v1 = home.current()
    bad_model = tmp_path / "collapsed"
    bad_id = _save_model(bad_model, seed=1, collapse=True)
    assert bad_id != world["model_id"]

    # validation queries from another model than --model: refused before any work
    with pytest.raises(SystemExit) as e:
        run_main(main, argv(world, m1, tmp_path, model=bad_model))
    assert e.value.code == 2 and "come from model" in capsys.readouterr().err

    bad_val = tmp_path / "bad_val"
    embed_local(world["queries"], str(world["data"]), str(bad_model), None, str(bad_val))
    # a model change re-embeds everything; compared with the recorded mAP of the published one
    with pytest.raises(SystemExit) as e:
        run_main(main, argv(world, m1, tmp_path, model=bad_model, val=bad_val))
    assert e.value.code == 2 and "gate refused" in capsys.readouterr().err
    s = last_run(tmp_path / "work")
    assert s["embed"]["embedded"] == world["gallery"].num_rows and s["embed"]["carried"] == 0
    assert s["centroids"]["mode"] == "full"
    assert home.current() == v1 and home.list_versions() == [v1]
    # ... and by evaluating the published version with its own model's queries
    with pytest.raises(SystemExit) as e:
        run_main(main, argv(world, m1, tmp_path, "--published-validation", str(world["val"]),
                            model=bad_model, val=bad_val))
    assert e.value.code == 2 and "gate refused" in capsys.readouterr().err
    s = last_run(tmp_path / "work")
    assert s["embed"]["embedded"] == 0  # the refused run's embeddings were kept as the cache
    assert home.current() == v1
    # back to the good model: its embeddings (those of the published version) are still the
    # cache, so nothing is embedded; the same quality passes the gate
    assert main(argv(world, m1, tmp_path)) == 0
    s = last_run(tmp_path / "work")
    assert s["embed"]["embedded"] == 0 and s["centroids"]["mode"] == "full"
    assert s["run"]["status"] == "published" and abs(s["gate"]["new_mAP"] - s["gate"]["old_mAP"]) < 1e-9


def test_gate_decision_rules():
    new = {"mAP": 0.50, "num_valid_queries": 10, "num_queries": 10, "k": 100}
    assert G.gate_decision(new, None, 1.0, 0.95, 0.01).passed
    assert G.gate_decision(new, {"mAP": 0.505}, 1.0, 0.95, 0.01).passed
    refused = G.gate_decision(new, {"mAP": 0.52, "version": "v1"}, 1.0, 0.95, 0.01)
    assert not refused.passed and "0.5200" in refused.reason and "v1" in refused.reason
    low = G.gate_decision(new, None, 0.90, 0.95, 0.01)
    assert not low.passed and "recall" in low.reason
    none_valid = G.gate_decision({**new, "num_valid_queries": 0}, None, 1.0, 0.95, 0.01)
    assert not none_valid.passed


# ---------------------------------------------------------------- centroids update (no model)


def _emb_dir(path: Path, image_ids, items, cams, vecs, model="m") -> str:
    from contracts.vectors import make_embeddings_table, write_table_atomic

    t = make_embeddings_table(image_ids, items, cams, ["gallery"] * len(items), vecs, model)
    t = t.append_column("content_hash", pa.array([f"h{i}" for i in image_ids], pa.string()))
    write_table_atomic(t, str(path / "part-00000.parquet"))
    return str(path)


def test_update_centroids_equals_full_recompute(tmp_path):
    from contracts.vectors import l2_normalize, read_vectors

    rng = np.random.default_rng(0)
    n, d = 300, 8
    vecs = l2_normalize(rng.normal(size=(n + 40, d)))
    items = rng.integers(0, 30, n + 40).astype(str)
    cams = rng.integers(1, 4, n + 40)
    ids = np.array([f"img{i}" for i in range(n + 40)])
    old = _emb_dir(tmp_path / "old", ids[:n], items[:n], cams[:n], vecs[:n])
    incremental.compute_centroids(old, str(tmp_path / "c_old"), batch_size=64)
    # new night: 40 added, rows 0..24 removed, item 7 loses every image
    keep = np.r_[np.arange(25, n + 40)]
    keep = keep[items[keep] != "7"]
    new = _emb_dir(tmp_path / "new", ids[keep], items[keep], cams[keep], vecs[keep])
    delta = incremental.diff_embeddings(old, new, batch_size=50)
    assert delta.n_added == int((keep >= n).sum()) and delta.n_removed == n - int((keep < n).sum())
    stats = incremental.update_centroids(str(tmp_path / "c_old"), delta, str(tmp_path / "c_new"), "m", d, batch_size=16)
    full = incremental.compute_centroids(new, str(tmp_path / "c_full"))
    assert (stats.items, stats.images, stats.pairs) == (full.items, full.images, full.pairs)
    a = read_vectors(str(tmp_path / "c_new" / incremental.CENTROIDS_FILE), kind="centroids")
    b = read_vectors(str(tmp_path / "c_full" / incremental.CENTROIDS_FILE), kind="centroids")
    oa, ob = np.argsort(a.item_ids.astype(str)), np.argsort(b.item_ids.astype(str))
    assert list(a.item_ids[oa]) == list(b.item_ids[ob]) and "7" not in set(a.item_ids)
    assert np.abs(a.vectors[oa] - b.vectors[ob]).max() < 1e-6
    pa_, _ = C.read_pair_sums(str(tmp_path / "c_new" / incremental.SUMS_FILE))
    pb, _ = C.read_pair_sums(str(tmp_path / "c_full" / incremental.SUMS_FILE))
    assert (pa_.counts == pb.counts).all() and np.abs(pa_.sums - pb.sums).max() < 1e-9


# ---------------------------------------------------------------- lock and crashes


def test_lock_stops_a_second_run(world, tmp_path, capsys):
    from pipelines._cli import run_main
    from pipelines.reindex import main

    m = night(tmp_path, world["gallery"], "g")
    home = IndexHome.of(str(tmp_path / "indexes"), "gallery")
    os.makedirs(home.path, exist_ok=True)
    # a run holding the index lock (other work dir) and one holding this work dir's lock
    for held in (os.path.join(home.path, S.LOCK_FILE), str(tmp_path / "work" / S.LOCK_FILE)):
        with S.RunLock(held):
            with pytest.raises(SystemExit) as e:
                run_main(main, argv(world, m, tmp_path))
            assert e.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "another reindex run holds the lock" in err[0]
            assert f"pid {os.getpid()}" in err[0]
            assert home.current() is None
    with S.RunLock(str(tmp_path / "l")):  # released on exit: can be taken again
        pass
    with S.RunLock(str(tmp_path / "l")), pytest.raises(S.LockHeldError):
        S.RunLock(str(tmp_path / "l")).acquire()


@pytest.mark.parametrize("step", ["embed", "build", "publish"])
def test_killed_run_then_rerun(world, tmp_path, step):
    """SIGKILL right after `step`, then the same command again. "build" is killed on a second
    night (+20, -5) with a version already published; the others on the first night. The index
    holds image embeddings here, so "one row per image" is checked in the index too."""
    from index.ann.search import open_index
    from pipelines.reindex import KILL_ENV, main

    g = world["gallery"]
    home = IndexHome.of(str(tmp_path / "indexes"), "gallery")
    opts = ("--index-kind", "embeddings", *GROWTH)
    v1 = None
    if step == "build":
        m1 = night(tmp_path, g.slice(0, g.num_rows - HELD_BACK), "n1")
        assert main(argv(world, m1, tmp_path, *opts)) == 0
        v1 = home.current()
    rows = g.slice(REMOVED) if step == "build" else g
    m2 = night(tmp_path, rows, "n2")
    proc = subprocess.run([sys.executable, "pipelines/reindex.py", *argv(world, m2, tmp_path, *opts)],
                          cwd=REPO, env={**os.environ, KILL_ENV: step}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = [e for e in S.read_log(str(tmp_path / "work" / S.LOG_FILE)) if e["step"] == step]
    assert killed and killed[-1]["status"] == "done"
    # what readers see right after the kill: the old version (or none), or the new one once
    # CURRENT was swapped; never a half-written one
    if step == "publish":
        assert home.current() == home.list_versions()[-1]
        home.verify()
    else:
        assert home.current() == v1
        if v1:
            home.verify()

    assert main(argv(world, m2, tmp_path, *opts)) == 0
    s = last_run(tmp_path / "work")
    if step == "publish":  # the killed run had published: recovered, nothing left to do
        assert s["run"]["status"] == "up-to-date" and s["embed"]["embedded"] == 0
    else:  # the killed run's embeddings serve as the cache: nothing is embedded twice
        assert s["run"]["status"] == "published" and s["embed"]["embedded"] == 0
    expected = sorted(rows.column("image_id").to_pylist())
    assert sorted(committed_image_ids(tmp_path / "work")) == expected
    home.verify()
    versions = home.list_versions()
    assert home.current() == versions[-1] and versions == ([v1] if v1 else []) + [versions[-1]]
    with open_index(home.path) as idx:
        assert sorted(idx._labels.column("image_id").to_pylist()) == expected
    work = tmp_path / "work"
    assert not (work / S.PENDING_FILE).exists()
    assert len([p for p in work.iterdir() if p.name.startswith("gen-")]) == 1
    assert not [p for p in Path(home.path).iterdir() if p.name.startswith(".tmp")]


def test_bad_input_is_one_line(world, tmp_path, capsys):
    from pipelines._cli import run_main
    from pipelines.reindex import main

    m = night(tmp_path, world["gallery"], "g")
    cases = [
        (argv(world, tmp_path / "missing.parquet", tmp_path), "manifest not found"),
        (argv(world, m, tmp_path, "--keep", "0"), "--keep"),
        (argv(world, m, tmp_path, val=tmp_path / "nope"), "no such file"),
        (argv(world, m, tmp_path, "--split", "train"), "no rows of split train"),
    ]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            run_main(main, args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "indexes" / "gallery" / "CURRENT").exists()

    # an image that cannot be read leaves the gallery; more such than allowed stops the run
    g = world["gallery"]
    paths = g.column("path").to_pylist()
    paths[3] = "bounding_box_test/missing.jpg"
    broken = night(tmp_path, g.set_column(g.schema.get_field_index("path"), "path",
                                                 pa.array(paths, pa.string())), "broken")
    with pytest.raises(SystemExit) as e:
        run_main(main, argv(world, broken, tmp_path, "--max-error-fraction", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"1 of {g.num_rows} gallery images could not be embedded" in err[0]
    assert not (tmp_path / "indexes" / "gallery" / "CURRENT").exists()
    assert main(argv(world, broken, tmp_path)) == 0  # 1% is within the default 5%
    assert sorted(committed_image_ids(tmp_path / "work")) == sorted(
        i for k, i in enumerate(g.column("image_id").to_pylist()) if k != 3)


# ---------------------------------------------------------------- through `ray job submit`


@pytest.mark.slow
def test_three_nights_as_ray_jobs_on_a_local_head(world, tmp_path):
    """A private local head; each night is `ray job submit ... -- python pipelines/reindex.py`
    (Ray Data embedding on the head's workers), all paths absolute."""
    from cluster import jobs, local
    from index.ann.search import open_index

    g = world["gallery"]
    n = g.num_rows
    first = g.slice(0, n - HELD_BACK)
    third = g.slice(REMOVED)  # the 20 held back come in, the first 5 go
    m1, m3 = night(tmp_path, first, "night1"), night(tmp_path, third, "night3")
    work, home = tmp_path / "work", IndexHome.of(str(tmp_path / "indexes"), "gallery")

    def job_args(manifest: Path) -> tuple[str, ...]:
        a = argv(world, manifest, tmp_path, *GROWTH, "--batch-size", "16")
        i = a.index("--executor")
        return tuple(a[:i] + a[i + 2:])  # default executor: Ray

    with local.local_head(num_cpus=3, object_store_memory=200 * 1024**2) as head:
        def submit(manifest: Path) -> dict:
            res = jobs.submit(jobs.JobSpec(script="pipelines/reindex.py", args=job_args(manifest),
                                           address=head.dashboard_url, working_dir=str(REPO)),
                              env=head.client_env(), timeout=900)
            assert (res.status, res.exit_code) == ("SUCCEEDED", 0), res
            return last_run(work)

        s1 = submit(m1)
        assert s1["embed"]["embedded"] == first.num_rows and s1["run"]["status"] == "published"
        v1 = home.current()
        s2 = submit(m1)
        assert s2["embed"]["embedded"] == 0 and s2["embed"]["carried"] == first.num_rows
        assert home.current() == v1
        s3 = submit(m3)
    assert s3["embed"]["embedded"] == HELD_BACK
    assert (s3["centroids"]["added"], s3["centroids"]["removed"]) == (HELD_BACK, REMOVED)
    assert s3["run"]["status"] == "published" and home.current() != v1
    assert sorted(committed_image_ids(work)) == sorted(third.column("image_id").to_pylist())
    items = set(third.column("item_id").to_pylist())
    with open_index(home.path, verify=True) as idx:
        assert len(idx) == len(items) and set(idx._labels.column("item_id").to_pylist()) == items


def test_cli_defaults_are_the_config_defaults():
    from dataclasses import MISSING, fields

    from index.nightly.runner import ReindexConfig
    from pipelines.reindex import build_parser

    args = vars(build_parser().parse_args(["--gallery-manifest", "m", "--model", "x", "--work", "w",
                                            "--index-root", "r", "--name", "n", "--validation", "v"]))
    shared = [f for f in fields(ReindexConfig)
              if f.name in args and f.name != "batch_size" and f.default is not MISSING]
    assert len(shared) >= 9
    assert {f.name: args[f.name] for f in shared} == {f.name: f.default for f in shared}


def test_rerank_graph_is_built_with_each_version(world, tmp_path):
    """--rerank-graph K: the published version holds the graph, hashed in its manifest."""
    from index.rerank.graph import load_gallery_graph
    from pipelines.reindex import main

    m1 = night(tmp_path, world["gallery"], "night1")
    assert main(argv(world, m1, tmp_path, "--index-kind", "embeddings", "--rerank-graph", "12")) == 0
    home = IndexHome.of(str(tmp_path / "indexes"), "gallery")
    manifest = home.manifest()
    assert manifest["rerank_graph"]["k"] == 12 and "rerank-graph.npz" in manifest["files"]
    home.verify()
    graph = load_gallery_graph(str(Path(home.version_dir(home.current())) / "rerank-graph.npz"))
    assert len(graph) == manifest["num_vectors"] and graph.k == 12
    assert (graph.ids[:, 0] == np.arange(len(graph))).mean() > 0.95  # a vector's nearest is itself
