"""The pipeline on 1 Ray node vs 3 Ray nodes of the same total CPUs, and what a lost node costs.

    python benchmarks/multinode.py --work /tmp/mn --out benchmarks/results/multinode.json

Layouts (cluster.local, all on this machine, so only the scheduling and the node boundaries
differ, not the hardware): "1 node" is a head with --cpus CPUs; "3 nodes" is a head with 0 CPUs
(job drivers only) plus 2 worker nodes of --cpus/2 CPUs each, every node its own raylet and
object store. On each, every stage is the real job submitted with `ray job submit`
(cluster.jobs), timed from submission to the job's end (so each figure includes ~the same job
start-up): make_shards, embed (2 model actors), centroids, build_index (2 shards), query --ray
(one actor per shard), evaluate, and train (2 DDP ranks of 1 CPU: one per worker node on 3
nodes; a few short epochs of ResNet-18 at 32x16 from random weights). Then, on fresh 3-node
clusters, embed and train once more while worker w1 is SIGKILLed (embed: at about half the
batches; train: after its first checkpoints) and a replacement node joins (what an autoscaler
does): the difference to the plain 3-node run is what the lost node cost. The embedding model
is a random ResNet-18 at 32x16 (speed only; no weights are downloaded).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json
import os
import platform
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_inputs(work: pathlib.Path, items: int, per_item: int) -> None:
    """Synthetic dataset (raw images; make_shards is a timed stage) and a tiny model."""
    import torch

    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model
    from pipelines import make_synthetic

    if not (work / "data").exists():
        assert make_synthetic.main(["--items", str(items), "--images-per-item", str(per_item),
                                    "--cameras", "2", "--size", "64x32", "--out", str(work / "data"),
                                    "--workers", "1"]) == 0
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    save_model(build_model(cfg).eval(), cfg, str(work / "model"))


def stages(work: pathlib.Path, run: pathlib.Path) -> list[tuple[str, str, list[str]]]:
    """(stage, script, args) in pipeline order; outputs under `run`."""
    emb, cents, idx, res = run / "emb", run / "cents", run / "idx", run / "res"
    return [
        ("make_shards", "pipelines/make_shards.py",
         ["--format", "market1501", "--root", work / "data", "--out", run / "shards",
          "--shard-size", "64", "--workers", "1"]),
        ("embed", "pipelines/embed.py",
         ["--model", work / "model", "--shards", run / "shards" / "shards", "--out", emb,
          "--actors", "2", "--threads", "1", "--batch-size", "32"]),
        ("centroids", "pipelines/centroids.py", ["--embeddings", emb, "--split", "gallery", "--out", cents]),
        ("build_index", "pipelines/build_index.py",
         ["--vectors", cents / "centroids.parquet", "--root", idx, "--name", "g", "--shards", "2",
          "--version", "v1"]),
        ("query --ray", "pipelines/query.py",
         ["--index", idx / "g", "--queries", emb, "--split", "query", "--k", "10", "--ray", "--out", res]),
        ("evaluate", "pipelines/evaluate.py",
         ["--results", res, "--query", emb, "--query-split", "query", "--gallery-labels", emb,
          "--gallery-split", "gallery", "--out", run / "report.json"]),
        ("train", "pipelines/train.py", train_args(run / "shards" / "shards", run / "train")),
    ]


TRAIN_EPOCHS = 4


def train_args(shards: pathlib.Path, out: pathlib.Path) -> list:
    return ["--shards", shards, "--backbone", "resnet18", "--input-size", "32", "16", "--P", "4",
            "--M", "4", "--epochs", TRAIN_EPOCHS, "--steps-per-epoch", "10", "--warmup-epochs", "1",
            "--num-workers", "2", "--cpus-per-worker", "1", "--loader-threads", "1",
            "--eval-every", "-1", "--use-gpu", "false", "--max-failures", "3", "--name", "bench",
            "--storage-path", out / "ray", "--output", out / "model"]


def submit(head, script: str, args: list) -> float:
    """Run one job on `head`; returns its wall seconds (raises if it failed)."""
    from cluster import jobs

    spec = jobs.JobSpec(script=script, args=tuple(map(str, args)), address=head.dashboard_url,
                        working_dir=str(REPO))
    t0 = time.perf_counter()
    r = jobs.submit(spec, env=head.client_env(), timeout=1800)
    wall = time.perf_counter() - t0
    if r.exit_code != 0:
        raise SystemExit(f"{script} failed (exit {r.exit_code}): {r.message[-500:]}")
    return round(wall, 1)


def run_layout(name: str, work: pathlib.Path, nodes: int, cpus: int) -> dict:
    from cluster import local

    run = work / name.replace(" ", "_")
    head_cpus, node_cpus = (cpus, 0) if nodes == 1 else (0, cpus // (nodes - 1))
    print(f"\n== {name}: head {head_cpus} CPU(s)" + (f" + {nodes - 1} x {node_cpus}" if nodes > 1 else ""),
          flush=True)
    out = {}
    with local.local_cluster(nodes=nodes, head_cpus=head_cpus, node_cpus=node_cpus) as head:
        for stage, script, args in stages(work, run):
            out[stage] = submit(head, script, args)
            print(f"   {stage}: {out[stage]} s", flush=True)
    return out


def embed_with_a_lost_node(work: pathlib.Path, cpus: int, images: int, batch: int = 32) -> dict:
    """Embed on head 0 + 2 workers; SIGKILL w1 at ~half the batches, add w3; wall seconds."""
    from cluster import local

    run = work / "lost_node"
    progress = run / "progress"
    progress.mkdir(parents=True, exist_ok=True)
    args = ["--model", work / "model", "--shards", work / "3_nodes" / "shards" / "shards",
            "--out", run / "emb", "--actors", "2", "--threads", "1", "--batch-size", str(batch)]
    half = max(1, images // batch // 2)
    with local.local_cluster(nodes=3, head_cpus=0, node_cpus=cpus // 2) as head:
        result = {}
        job = threading.Thread(target=lambda: result.update(
            s=submit(head, "tests/cluster/slow_embed_job.py", [progress, 0, *args])))
        job.start()
        deadline = time.monotonic() + 1800
        while len(os.listdir(progress)) < half and job.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        killed_at = len(os.listdir(progress))
        if job.is_alive():
            local.kill_node(head, "w1")
            local.add_node(head, "w3", num_cpus=cpus // 2)
        job.join()
    if "s" not in result:
        raise SystemExit("embed with a lost node failed")
    return {"embed": result["s"], "batches_before_kill": killed_at, "batches_total": len(os.listdir(progress))}


def train_with_a_lost_node(work: pathlib.Path, cpus: int) -> dict:
    """Train on head 0 + 2 workers; SIGKILL w1 after 2 epochs are checkpointed, add w3."""
    from cluster import local

    run = work / "lost_node_train"
    history = run / "ray" / "bench" / "epochs.jsonl"
    with local.local_cluster(nodes=3, head_cpus=0, node_cpus=cpus // 2) as head:
        result = {}
        job = threading.Thread(target=lambda: result.update(
            s=submit(head, "pipelines/train.py", train_args(work / "3_nodes" / "shards" / "shards", run))))
        job.start()
        deadline = time.monotonic() + 1800
        def epochs():
            return len(history.read_text().splitlines()) if history.exists() else 0
        while epochs() < 2 and job.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        killed_after = epochs()
        if job.is_alive():
            local.kill_node(head, "w1")
            local.add_node(head, "w3", num_cpus=cpus // 2)
        job.join()
    if "s" not in result:
        raise SystemExit("train with a lost node failed")
    rows = [json.loads(x) for x in history.read_text().splitlines()]
    return {"train": result["s"], "epochs_before_kill": killed_after,
            "epoch_records": len(rows), "resumed_at": max(r["resumed_at"] for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch directory (data, outputs)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multinode.json"))
    p.add_argument("--items", type=int, default=100, help="synthetic identities (default 100)")
    p.add_argument("--images-per-item", type=int, default=6, help="images per identity (default 6)")
    p.add_argument("--cpus", type=int, default=2, help="total CPUs of each layout (default 2)")
    a = p.parse_args(argv)
    if a.cpus < 2 or a.cpus % 2:
        raise SystemExit("--cpus must be an even number >= 2 (split over 2 worker nodes)")
    work = pathlib.Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    make_inputs(work, a.items, a.images_per_item)
    t_start = time.time()
    one = run_layout("1 node", work, 1, a.cpus)
    three = run_layout("3 nodes", work, 3, a.cpus)
    from contracts.vectors import read_vectors

    images = len(read_vectors(str(work / "3_nodes" / "emb"), kind="embeddings"))
    lost = embed_with_a_lost_node(work, a.cpus, images)
    lost_train = train_with_a_lost_node(work, a.cpus)
    rows = [(s, one[s], three[s]) for s in one]
    print(f"\n{'stage':<14}{'1 node x ' + str(a.cpus) + ' CPU':>18}{'3 nodes (0+2x' + str(a.cpus // 2) + ')':>20}")
    for s, x, y in rows:
        print(f"{s:<14}{x:>16.1f} s{y:>18.1f} s")
    print(f"{'total':<14}{sum(one.values()):>16.1f} s{sum(three.values()):>18.1f} s")
    print(f"embed with w1 killed after {lost['batches_before_kill']} of ~{images // 32} batches and a "
          f"replacement added: {lost['embed']} s (vs {three['embed']} s without the loss)")
    print(f"train with w1 killed after {lost_train['epochs_before_kill']} of {TRAIN_EPOCHS} epochs and a "
          f"replacement added: {lost_train['train']} s (vs {three['train']} s without the loss; "
          f"resumed after epoch {lost_train['resumed_at'] - 1})")
    result = {"images": images, "items": a.items, "images_per_item": a.images_per_item,
              "cpus": a.cpus, "one_node_s": one, "three_nodes_s": three, "lost_node": lost,
              "lost_node_cost_s": round(lost["embed"] - three["embed"], 1),
              "lost_node_train": lost_train,
              "lost_node_train_cost_s": round(lost_train["train"] - three["train"], 1),
              "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_avg_at_start": os.getloadavg()},
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
              "command": "python benchmarks/multinode.py " + " ".join(argv or sys.argv[1:])}
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
