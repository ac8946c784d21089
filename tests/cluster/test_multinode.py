"""The pipeline across several Ray nodes on this machine (cluster.local: a head and 2 worker
nodes of 1 CPU each, each its own raylet), submitted with `ray job submit`. The state API
shows the work ran on more than one node; outputs equal a single-process run of the same
inputs. Data lives on this machine's disk, which every node here shares (on a real cluster:
object storage, see tests/cluster/test_s3_pipeline.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster import jobs, local

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[2]

_ACTORS = ("import json, sys\n"
           "from ray.util.state import list_actors\n"
           "print(json.dumps([(a.actor_id, a.class_name, a.node_id) for a in "
           "list_actors(address=sys.argv[1], limit=10000, detail=False)]))\n")


def actors(head) -> list[tuple[str, str, str]]:
    """(actor id, class name, node id) of every actor the cluster ever ran (state API)."""
    r = subprocess.run([sys.executable, "-c", _ACTORS, head.dashboard_url], env=head.client_env(),
                       capture_output=True, text=True, timeout=120, check=True)
    return [tuple(a) for a in json.loads(r.stdout.strip().splitlines()[-1])]


def submit(head, script, *args):
    spec = jobs.JobSpec(script=script, args=tuple(map(str, args)), address=head.dashboard_url,
                        working_dir=str(REPO))
    return jobs.submit(spec, env=head.client_env(), timeout=600)


@pytest.fixture(scope="module")
def cluster():
    with local.local_cluster(nodes=3, head_cpus=1, node_cpus=1) as head:
        yield head


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny shards (two items per camera pair) and a tiny model, on the shared local disk."""
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model
    from pipelines import make_shards, make_synthetic

    d = tmp_path_factory.mktemp("mn")
    assert make_synthetic.main(["--items", "6", "--images-per-item", "4", "--cameras", "2", "--size",
                                "32x16", "--out", str(d / "data"), "--workers", "1"]) == 0
    assert make_shards.main(["--format", "market1501", "--root", str(d / "data"), "--out",
                             str(d / "shards"), "--shard-size", "4", "--workers", "1"]) == 0
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    save_model(build_model(cfg).eval(), cfg, str(d / "model"))
    return d


@pytest.mark.slow
def test_make_shards_as_a_job_equals_a_local_run(cluster, data, tmp_path):
    import pyarrow.parquet as pq

    r = submit(cluster, "pipelines/make_shards.py", "--format", "market1501", "--root", data / "data",
               "--out", tmp_path / "shards", "--shard-size", "4", "--workers", "1")
    assert r.exit_code == 0, r.message
    a = pq.read_table(tmp_path / "shards" / "manifest.parquet")
    b = pq.read_table(data / "shards" / "manifest.parquet")
    assert a.num_rows == 26 and a.equals(b)
    assert sorted(p.name for p in (tmp_path / "shards" / "shards").iterdir()) == \
        sorted(p.name for p in (data / "shards" / "shards").iterdir())


@pytest.mark.slow
def test_embed_centroids_evaluate_and_query_run_on_several_nodes_and_equal_one_process(cluster, data, tmp_path):
    from contracts.results import read_results
    from contracts.vectors import read_vectors
    from model.embedding import ModelRunner
    from model.shards import iter_shard_samples, list_shards
    from pipelines import build_index, query

    before = {a[0] for a in actors(cluster)}
    r = submit(cluster, "pipelines/embed.py", "--model", data / "model", "--shards",
               data / "shards" / "shards", "--out", tmp_path / "emb", "--actors", "2",
               "--batch-size", "4", "--threads", "1")
    assert r.exit_code == 0, r.message
    embed_nodes = {n for i, c, n in actors(cluster) if i not in before and "EmbedBatch" in c}
    assert len(embed_nodes) >= 2, embed_nodes  # the 2 model actors on 2 different nodes

    got = read_vectors(str(tmp_path / "emb"), kind="embeddings")
    samples = list(iter_shard_samples(list_shards(str(data / "shards" / "shards"))))
    ref = ModelRunner(str(data / "model"), device="cpu", threads=1, decode_threads=1)
    ref_vec = dict(zip([s[3]["image_id"] for s in samples],
                       ref.embed_images([s[1] for s in samples]).embeddings))
    assert sorted(got.image_ids) == sorted(ref_vec) and len(ref_vec) == 26  # each image once
    for i, e in zip(got.image_ids, got.vectors):
        assert np.abs(e - ref_vec[i]).max() < 1e-5

    # centroids: the groupby-mean's tasks on the cluster equal the one-process reference
    from index.centroids.aggregate import centroids_reference

    r = submit(cluster, "pipelines/centroids.py", "--embeddings", tmp_path / "emb", "--out", tmp_path / "cent")
    assert r.exit_code == 0, r.message
    cents = read_vectors(str(tmp_path / "cent" / "centroids.parquet"), kind="centroids")
    ref_c = centroids_reference(got.item_ids, got.camera_ids, got.vectors)
    order = {item: i for i, item in enumerate(ref_c.item_ids)}
    assert sorted(cents.item_ids) == sorted(ref_c.item_ids)
    for item, v in zip(cents.item_ids, cents.vectors):
        assert np.abs(v - ref_c.embeddings[order[item]]).max() < 1e-5, item

    # evaluate as a job: the same figures as in this process
    from pipelines import evaluate

    ev = ["--query", tmp_path / "emb", "--query-split", "query", "--gallery", tmp_path / "emb",
          "--gallery-split", "gallery", "--mode", "both"]
    r = submit(cluster, "pipelines/evaluate.py", *ev, "--out", tmp_path / "eval_job.json")
    assert r.exit_code == 0, r.message
    assert evaluate.main([*map(str, ev), "--out", str(tmp_path / "eval_local.json")]) == 0
    job_rep = json.loads((tmp_path / "eval_job.json").read_text())
    local_rep = json.loads((tmp_path / "eval_local.json").read_text())
    assert [(m["mode"], m["mAP"], m["cmc"]) for m in job_rep] == [(m["mode"], m["mAP"], m["cmc"]) for m in local_rep]

    # an index of 2 shards searched by 2 shard actors (1 CPU each: 2 nodes) equals local search
    assert build_index.main(["--vectors", str(tmp_path / "emb"), "--root", str(tmp_path / "idx"),
                             "--name", "g", "--shards", "2", "--version", "v1"]) == 0
    before = {a[0] for a in actors(cluster)}
    r = submit(cluster, "pipelines/query.py", "--index", tmp_path / "idx" / "g", "--queries",
               tmp_path / "emb", "--split", "query", "--k", "5", "--ray", "--out", tmp_path / "res_ray")
    assert r.exit_code == 0, r.message
    shard_nodes = {n for i, c, n in actors(cluster) if i not in before and "ShardActor" in c}
    assert len(shard_nodes) >= 2, shard_nodes
    assert query.main(["--index", str(tmp_path / "idx" / "g"), "--queries", str(tmp_path / "emb"),
                       "--split", "query", "--k", "5", "--out", str(tmp_path / "res_local")]) == 0
    a, b = read_results(str(tmp_path / "res_ray")), read_results(str(tmp_path / "res_local"))
    assert a.num_rows > 0
    for col in ("query_id", "rank", "item_id", "image_id"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist()
    assert np.allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-5)


def _state(model_dir):
    return torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_train_puts_its_ddp_ranks_on_two_nodes_and_equals_one_node(cluster, tmp_path, monkeypatch):
    """2 DDP workers of 1 CPU: on 1-CPU nodes they must be on two nodes. The model equals the
    same run's on one embedded Ray node (same seed: same data, same all-reduced gradients)."""
    import ray

    from pipelines import train
    from tests.pipelines.test_train import _args, make_tiny_shards

    shards = make_tiny_shards(tmp_path)
    args = _args(shards, tmp_path, 2, extra=("--eval-every", "-1"))
    args = [a for a in args if a not in ("--num-cpus", "4")]
    before = {a[0] for a in actors(cluster)}
    cluster_args = [*args[:args.index("--output")], "--output", str(tmp_path / "model_mn"),
                    *args[args.index("--output") + 2:]]
    r = submit(cluster, "pipelines/train.py", *cluster_args)
    assert r.exit_code == 0, r.message
    rank_nodes = {n for i, c, n in actors(cluster) if i not in before and "TrainWorker" in c}
    assert len(rank_nodes) == 2, rank_nodes

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one = [*args[:args.index("--output")], "--output", str(tmp_path / "model_1"),
           *args[args.index("--output") + 2:], "--num-cpus", "2", "--name", "tiny1"]
    try:
        assert train.main(one) == 0
    finally:
        ray.shutdown()
    a, b = _state(tmp_path / "model_mn"), _state(tmp_path / "model_1")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    assert json.loads((tmp_path / "model_mn" / "training.json").read_text())["epochs_trained"] == 2
