"""End to end: a 2-worker Ray Train run on tiny synthetic shards, resume, worker failure."""
import io
import json
from pathlib import Path

import numpy as np
import pytest

from model.shards import write_shards

pytestmark = pytest.mark.slow


def make_tiny_shards(root, n_train=8, n_test=4, per_item=4, size=(32, 16), seed=0):
    """Items are flat colours + noise: learnable in a few steps. Returns the shards folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = root / "data"
    colours = rng.integers(0, 255, size=(n_train + n_test, 3))
    splits = {"train": [], "query": [], "gallery": []}
    for item in range(n_train + n_test):
        for j in range(per_item):
            arr = np.clip(colours[item] + rng.normal(0, 12, (*size, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            cam = j % 2 + 1
            if item < n_train:
                split = "train"
            else:
                split = "query" if j == 0 else "gallery"
            iid = f"{split}/{item + 1:04d}_c{cam}_{j:03d}.jpg"
            splits[split].append(({"image_id": iid, "item_id": f"{item + 1:04d}", "camera_id": cam,
                                   "split": split, "path": iid}, buf.getvalue(), "jpg"))
    for split, rows in splits.items():
        rows.sort(key=lambda r: r[0]["image_id"])
        write_shards(rows, str(out / "shards"), split, shard_size=10)
    return out


def _args(shards, tmp_path, epochs, extra=()):
    return ["--shards", str(shards), "--backbone", "resnet18", "--input-size", "32", "16",
            "--P", "2", "--M", "3", "--epochs", str(epochs), "--warmup-epochs", "1",
            "--num-workers", "2", "--use-gpu", "false", "--loader-threads", "1",
            "--name", "tiny", "--storage-path", str(tmp_path / "ray"),
            "--output", str(tmp_path / "model"), "--set", "train.eval_batch_size=8",
            "--num-cpus", "4", *extra]


def test_two_workers_train_resume_and_failure(tmp_path, capfd, monkeypatch):
    import ray
    import torch

    from model.checkpoint import load_model
    from pipelines import train

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    shards = make_tiny_shards(tmp_path)
    try:  # one embedded Ray for both runs (the second attaches to it)
        # 1 epoch, 2 workers: a loadable model comes out
        assert train.main(_args(shards, tmp_path, 1)) == 0
        out = capfd.readouterr().out
        assert "epoch 0:" in out and "instance mAP=" in out
        net, cfg, mid1 = load_model(str(tmp_path / "model"))
        assert cfg.backbone == "resnet18" and cfg.num_classes == 8 and cfg.input_size == (32, 16)
        assert net(torch.zeros(2, 3, 32, 16)).shape == (2, 512)

        # same name + storage, more epochs: resumes after epoch 0; a worker dies at the start
        # of epoch 2 and the restarted group resumes from epoch 1's checkpoint
        monkeypatch.setenv("CR_TRAIN_FAIL_AT_EPOCH", "2")
        assert train.main(_args(shards, tmp_path, 3)) == 0
        out = capfd.readouterr().out
    finally:
        ray.shutdown()
    assert "resumed from checkpoint after epoch 0" in out
    assert "resumed from checkpoint after epoch 1" in out
    assert "fault injection: rank 1 exits at the start of epoch 2" in out
    assert "epoch 0:" not in out and "epoch 2:" in out
    # epoch 1 trained once (Ray may echo a worker's line twice: compare the distinct lines)
    assert len({line[line.index("epoch 1:"):] for line in out.splitlines() if "epoch 1:" in line}) == 1
    final = json.loads(out[out.index("{", out.index("done in")):])
    assert final["epoch"] == 2 and final["resumed_at"] == 2
    assert load_model(str(tmp_path / "model"))[2] != mid1


def test_bad_input_is_one_line_error(tmp_path, capsys):
    from pipelines import train
    from pipelines._cli import run_main

    for argv, msg in [
        (["--shards", str(tmp_path / "none")], "no shards at"),
        (["--shards", str(tmp_path), "--set", "train.bogus=1"], "unknown config key"),
        (["--shards", str(tmp_path), "--pretrained", str(tmp_path / "x.pt")], "not found"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_main(train.main, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err


def test_ray_job_submit_on_a_private_local_head(tmp_path):
    """`ray job submit --working-dir . -- python pipelines/train.py ...` against a private
    local head (started and stopped by the test, nothing else touched); absolute paths."""
    from cluster import jobs, local
    from model.checkpoint import load_model

    repo = Path(__file__).resolve().parents[2]
    shards = make_tiny_shards(tmp_path)
    args = _args(shards, tmp_path, 1, extra=("--eval-every", "-1"))
    args = [a for a in args if a not in ("--num-cpus", "4")]
    args[args.index("--num-workers") + 1] = "1"
    with local.local_head(num_cpus=3, object_store_memory=200 * 1024**2) as head:
        res = jobs.submit(jobs.JobSpec(script="pipelines/train.py", args=tuple(args),
                                       address=head.dashboard_url, working_dir=str(repo)),
                          env=head.client_env(), timeout=900)
    assert (res.status, res.exit_code) == ("SUCCEEDED", 0), res
    net, cfg, _ = load_model(str(tmp_path / "model"))
    assert cfg.num_classes == 8 and not net.training


def test_time_budget_sizes_the_run_and_is_recorded(tmp_path, capfd, monkeypatch):
    import ray

    from model.checkpoint import load_model
    from pipelines import train

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    shards = make_tiny_shards(tmp_path)
    args = _args(shards, tmp_path, 1)
    for opt in ("--epochs", "--warmup-epochs"):  # the budget sizes the run instead
        i = args.index(opt)
        del args[i:i + 2]
    try:
        assert train.main([*args, "--time-budget", "20s", "--eval-every", "-1"]) == 0
    finally:
        ray.shutdown()
    out = capfd.readouterr().out
    epochs = {line[line.index("epoch "):].split(":")[0] for line in out.splitlines()
              if "[budget: " in line}
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["time_budget_s"] == 20.0 and record["config"]["train"]["time_budget_s"] == 20.0
    assert record["epochs_trained"] == len(epochs) >= 1
    assert record["config"]["model"]["pooling"] == "rmac"  # the default recipe
    _, cfg, _ = load_model(str(tmp_path / "model"))
    assert cfg.flip_test is True
