"""GPU work on a cluster whose GPU nodes join later (an autoscaler's): `embed.py --device cuda`
and `train.py --use-gpu true` ask for GPUs and wait (progress lines), fail in one line when
none joins within --gpu-wait, and, when a node with a logical GPU joins after the job started
(`num_gpus=1` on this CPU machine: Ray schedules there, torch finds no CUDA device), place
their GPU work there and fail in one clear line, with nothing written."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import local
from tests.pipelines.test_embed import gallery, tiny_model, write  # noqa: F401 (fixture)
from tests.pipelines.test_train import make_tiny_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = ["--backbone", "resnet18", "--input-size", "32", "16", "--P", "2", "--M", "3",
        "--loader-threads", "1", "--epochs", "1"]


def test_cuda_waits_for_a_gpu_then_fails_in_one_line(tmp_path, tiny_model, ray_local):  # noqa: F811
    from pipelines.embed import main

    write(gallery(6), tmp_path / "s")
    with pytest.raises(RuntimeError, match=r"1 GPU\(s\) asked for, 0 joined the Ray cluster within 2s") as e:
        main(["--model", tiny_model, "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
              "--device", "cuda", "--gpu-wait", "2"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_train_use_gpu_true_waits_for_one_gpu_per_worker(tmp_path, ray_local):
    from pipelines import train

    shards = make_tiny_shards(tmp_path)
    with pytest.raises(RuntimeError, match=r"train: 2 GPU\(s\) asked for, 0 joined .* within 1s"):
        train.main(["--shards", str(shards), *TINY, "--num-workers", "2", "--use-gpu", "true", "--gpu-wait", "1",
                    "--storage-path", str(tmp_path / "ray"), "--output", str(tmp_path / "model")])
    assert not (tmp_path / "model").exists()


def start_job(head, script: str, *args) -> subprocess.Popen:
    """A job's driver attached to `head` (what `ray job submit` runs on the head)."""
    env = head.client_env()
    env["RAY_ADDRESS"] = head.gcs_address
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_then_add_gpu_node(head, job: subprocess.Popen, timeout: float = 300) -> list[str]:
    """Read the job's lines until it says it waits for a GPU, then join a logical GPU node."""
    lines, deadline = [], time.monotonic() + timeout
    for line in job.stdout:
        lines.append(line.rstrip())
        if "waiting up to" in line:
            break
        assert time.monotonic() < deadline, "the job never said it waits for a GPU"
    else:
        pytest.fail("the job ended before waiting for a GPU:\n" + "\n".join(lines[-20:]))
    assert "0 GPU(s) in the Ray cluster" in lines[-1]
    time.sleep(2)  # the job is polling; the node joins after it started waiting
    local.add_node(head, "g1", num_cpus=1, num_gpus=1)
    out, _ = job.communicate(timeout=timeout)
    return lines + out.splitlines()


@pytest.fixture
def cpu_head():
    with local.local_cluster(nodes=1, head_cpus=2) as head:
        yield head


def test_embed_places_its_gpu_actor_on_a_gpu_node_that_joins_later(tmp_path, tiny_model, cpu_head):  # noqa: F811
    write(gallery(6), tmp_path / "s")
    job = start_job(cpu_head, "pipelines/embed.py", "--model", tiny_model, "--shards", tmp_path / "s",
                    "--out", tmp_path / "o", "--device", "cuda", "--gpu-wait", "300", "--quiet")
    lines = wait_then_add_gpu_node(cpu_head, job)
    text = "\n".join(lines)
    assert job.returncode == 2, text[-3000:]
    assert any("1 GPU(s) joined after" in ln for ln in lines), text[-3000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "embed: no CUDA device on node" in errors[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert not (tmp_path / "o").exists()


def test_train_places_its_gpu_work_on_a_gpu_node_that_joins_later(tmp_path, cpu_head):
    shards = make_tiny_shards(tmp_path)
    job = start_job(cpu_head, "pipelines/train.py", "--shards", shards, *TINY, "--num-workers", "1", "--use-gpu", "true",
                    "--gpu-wait", "300", "--storage-path", tmp_path / "ray", "--output",
                    tmp_path / "model")
    lines = wait_then_add_gpu_node(cpu_head, job)
    text = "\n".join(lines)
    assert job.returncode == 2, text[-3000:]
    assert any("train: 1 GPU(s) joined after" in ln for ln in lines), text[-3000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "no CUDA device on node" in errors[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert not (tmp_path / "model").exists()
