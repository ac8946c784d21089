"""A worker node lost mid-job (cluster.local: head with 0 CPUs for the driver, 2 worker nodes).

embed: the model actors are spread over the two workers; one worker is SIGKILLed while its
actor is inside a batch, and a replacement node joins (what an autoscaler does). Ray Data
restarts the lost actor and re-runs its lost tasks; the job must end with exit 0, every
image exactly once and embeddings equal to a single-process run. Nothing is published at
--out unless the job completes.

query --ray: a node holding a shard actor is killed before the search; the job fails with one
line naming the lost actor and writes no results (never partial results).
"""
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cluster import jobs, local

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 48


def submit(head, script, *args, timeout=900):
    spec = jobs.JobSpec(script=script, args=tuple(map(str, args)), address=head.dashboard_url,
                        working_dir=str(REPO))
    return jobs.submit(spec, env=head.client_env(), timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and 48 gallery images in 6 shards, on this machine's disk (shared by the
    nodes here; object storage on a real cluster)."""
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model
    from model.shards import write_shards
    from tests.faults.images import jpeg

    d = tmp_path_factory.mktemp("loss")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    save_model(build_model(cfg).eval(), cfg, str(d / "model"))
    samples = [({"image_id": f"g/{i:04d}.jpg", "item_id": str(i // 4), "camera_id": i % 3 + 1,
                 "split": "gallery", "path": f"g/{i:04d}.jpg"}, jpeg(i), "jpg") for i in range(N_IMAGES)]
    write_shards(samples, str(d / "shards"), "gallery", shard_size=8)
    return d


def reference(world) -> dict[str, np.ndarray]:
    """image_id -> embedding from one process (no Ray)."""
    from model.embedding import ModelRunner
    from model.shards import iter_shard_samples, list_shards

    samples = list(iter_shard_samples(list_shards(str(world / "shards"))))
    ref = ModelRunner(str(world / "model"), device="cpu", threads=1, decode_threads=1)
    return dict(zip([s[3]["image_id"] for s in samples], ref.embed_images([s[1] for s in samples]).embeddings))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_embed_survives_a_worker_node_killed_mid_job(world, tmp_path):
    from contracts.vectors import read_vectors

    progress, out = tmp_path / "progress", tmp_path / "emb"
    progress.mkdir()
    with local.local_cluster(nodes=3, head_cpus=0, node_cpus=2) as head:
        def batches_on(node):
            return [p for p in os.listdir(progress) if p.startswith(f"{node}-")]

        result = {}
        job = threading.Thread(target=lambda: result.update(r=submit(
            head, "tests/cluster/slow_embed_job.py", progress, 0.5, "--model", world / "model",
            "--shards", world / "shards", "--out", out, "--actors", "2", "--batch-size", "4",
            "--threads", "1")))
        job.start()
        try:
            # mid-job: both workers hold a working actor, a few of the 12 batches are done
            wait_for(lambda: len(batches_on("w1")) >= 2 and batches_on("w2"), 600, "actors on w1 and w2")
            started = len(os.listdir(progress))
            assert started < N_IMAGES // 4, "the job finished before the kill"
            assert local.kill_node(head, "w1")  # a lost machine: raylet, object store, actors
            local.add_node(head, "w3", num_cpus=2)  # its replacement joins
        finally:
            job.join(timeout=900)
        r = result["r"]
        assert out.exists() == (r.exit_code == 0)  # nothing published unless complete
        assert r.exit_code == 0, r.message
        assert not job.is_alive()
    assert len(os.listdir(progress)) > started  # the rest ran on w2 and the new w3

    got = read_vectors(str(out), kind="embeddings")
    ref = reference(world)
    ids = list(got.image_ids)
    assert len(ids) == len(set(ids)) == len(ref) == N_IMAGES  # every image exactly once
    assert set(ids) == set(ref)
    for i, e in zip(ids, got.vectors):
        assert np.abs(e - ref[i]).max() < 1e-5, i
    summary = json.loads((out / "_embed.json").read_text())
    # no retried batch came back twice (the duplicate filter would have listed it as an error)
    assert summary["embedded"] == N_IMAGES and summary["errors"] == 0, summary


def test_query_ray_with_a_shard_node_killed_fails_in_one_line_and_writes_nothing(tmp_path, capfd):
    from pipelines import build_index
    from tests.index.index_data import clustered, write_vectors

    write_vectors(tmp_path / "emb.parquet", clustered(64, 8))
    assert build_index.main(["--vectors", str(tmp_path / "emb.parquet"), "--root", str(tmp_path / "idx"),
                             "--name", "g", "--shards", "2", "--version", "v1"]) == 0
    progress, out = tmp_path / "progress", tmp_path / "res"
    progress.mkdir()
    # one shard actor (1 CPU) per worker node; the head (0 CPUs) holds only the driver
    with local.local_cluster(nodes=3, head_cpus=0, node_cpus=1) as head:
        result = {}
        job = threading.Thread(target=lambda: result.update(r=submit(
            head, "tests/cluster/slow_query_job.py", progress, 0.5, "--index", tmp_path / "idx" / "g",
            "--queries", tmp_path / "emb.parquet", "--k", "5", "--batch-size", "8", "--ray",
            "--out", out)))
        job.start()
        try:
            names = lambda: {p.split("-")[0] for p in os.listdir(progress)}
            wait_for(lambda: {"w1", "w2"} <= names(), 600, "shard actors searching on w1 and w2")
            assert len(os.listdir(progress)) < 2 * 8, "the query finished before the kill"
            assert local.kill_node(head, "w1")
        finally:
            job.join(timeout=600)
        r = result["r"]
    assert r.exit_code == 2, r
    logs = capfd.readouterr().out  # `ray job submit` streams the job's output
    # one distinct error line (`ray job submit` may repeat the job's last lines in its summary)
    errors = {line for line in logs.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1 and "shard actor was lost" in errors.pop(), logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert not out.exists()  # never partial results


def test_training_resumes_from_its_checkpoint_when_a_worker_node_is_killed(tmp_path):
    """2 DDP ranks on w1 and w2; w1 is SIGKILLed after a few epochs and a replacement joins.
    Ray Train restarts the worker group from the last checkpoint; the run ends with its planned
    epochs, each epoch's record from one attempt, and the model is written only at the end."""
    from model.checkpoint import load_model
    from tests.pipelines.test_train import _args, make_tiny_shards

    shards = make_tiny_shards(tmp_path)
    epochs = 6
    args = [a for a in _args(shards, tmp_path, epochs, extra=("--eval-every", "-1", "--steps-per-epoch",
                                                             "12", "--max-failures", "3"))
            if a not in ("--num-cpus", "4")]
    history = tmp_path / "ray" / "tiny" / "epochs.jsonl"
    model = tmp_path / "model"

    def done_epochs():
        return [json.loads(x)["epoch"] for x in history.read_text().splitlines()] if history.exists() else []

    with local.local_cluster(nodes=3, head_cpus=0, node_cpus=1) as head:
        result = {}
        job = threading.Thread(target=lambda: result.update(r=submit(head, "pipelines/train.py", *args)))
        job.start()
        try:
            wait_for(lambda: len(done_epochs()) >= 2, 600, "two epochs checkpointed")
            at_kill = done_epochs()
            assert len(at_kill) < epochs, "the run finished before the kill"
            assert not model.exists()  # nothing published mid-run
            assert local.kill_node(head, "w1")
            local.add_node(head, "w3", num_cpus=1)
        finally:
            job.join(timeout=900)
        r = result["r"]
    assert r.exit_code == 0, r.message
    rows = [json.loads(x) for x in history.read_text().splitlines()]
    # every planned epoch finished; the ones after the kill by the restarted group, which
    # resumed after the last checkpoint it had (an epoch in flight at the kill is re-run)
    assert sorted({row["epoch"] for row in rows}) == list(range(epochs))
    resumed = [row for row in rows if row["resumed_at"] > 0]
    assert resumed and min(row["resumed_at"] for row in resumed) >= len(at_kill) - 1
    assert resumed[0]["epoch"] == resumed[0]["resumed_at"]
    training = json.loads((model / "training.json").read_text())
    assert training["epochs_trained"] == epochs
    net, cfg, _ = load_model(str(model))
    assert cfg.num_classes == 8 and not net.training
