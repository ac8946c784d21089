"""The Ray jobs (embed, centroids) under faults: embed killed mid-run (SIGKILL of the whole
process group) then re-run -> no duplicate and no missing row; every bad image kind and a
truncated shard through the real embed job -> recorded, not fatal; a full disk in embed and
centroids -> the previous output intact; bad vectors through centroids -> one-line error.

Slow (Ray): one Ray session in this process for the in-process runs, one child process for the
run that is killed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines._cli import run_main
from tests.faults.diskfull import FullParquetWriter, leftovers, tree
from tests.faults.images import bad_images, jpeg

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
N_GOOD = 24

# The killed run: the real job, with its part writer slowed down (slow storage) and announcing
# each write, so the test kills it while parts are being written.
SLOW_EMBED = """
import sys, time
sys.path.insert(0, sys.argv[1])
from contracts import parts
from pipelines import embed
from pipelines._cli import run_main
real = parts.PartWriter.write
def write(self, table):
    n = real(self, table)
    print("PART-WRITE", self.rows, flush=True)
    time.sleep(0.3)
    return n
parts.PartWriter.write = write
run_main(embed.main, sys.argv[2:])
"""


@pytest.fixture(scope="module")
def ray_module():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, and gallery shards with N_GOOD good images, every bad image kind and one
    truncated shard."""
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model
    from model.shards import key_for, write_shards

    tmp = tmp_path_factory.mktemp("rayjobs")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    save_model(build_model(cfg).eval(), cfg, str(tmp / "model"))
    samples = [({"image_id": f"g/{i:04d}.jpg", "item_id": str(i // 4), "camera_id": i % 3 + 1,
                 "split": "gallery", "path": f"g/{i:04d}.jpg"}, jpeg(i), "jpg") for i in range(N_GOOD)]
    samples += [({"image_id": f"g/bad-{n}", "item_id": "99", "camera_id": 1, "split": "gallery",
                  "path": f"g/bad-{n}"}, b, n.rsplit(".", 1)[1]) for n, b in sorted(bad_images().items())]
    samples.sort(key=lambda s: s[0]["image_id"])
    write_shards(samples, str(tmp / "shards"), "gallery", shard_size=8)
    # one more shard, cut inside its 2nd image: its 1st sample is read, the rest is an error
    tail = [({**r, "image_id": f"t/{i}.jpg", "path": f"t/{i}.jpg"}, jpeg(500 + i), "jpg")
            for i, (r, _, _) in enumerate(samples[:3])]
    (cut,) = write_shards(tail, str(tmp / "cut"), "gallery", shard_size=10)
    with tarfile.open(cut) as t:
        at = t.getmember(key_for("t/1.jpg") + ".jpg").offset_data + 40
    data = Path(cut).read_bytes()
    cut_path = tmp / "shards" / "gallery-000099.tar"
    cut_path.write_bytes(data[:at])
    Path(cut).unlink()
    good = {r["image_id"] for r, _, _ in samples if not r["image_id"].startswith("g/bad")} | {"t/0.jpg"}
    return {"tmp": tmp, "model": str(tmp / "model"), "shards": str(tmp / "shards"), "good": good,
            "cut": str(cut_path)}


def embed_args(world, out):
    return ["--model", world["model"], "--shards", world["shards"], "--out", str(out), "--batch-size", "4",
            "--threads", "1", "--decode-threads", "1", "--actors", "1", "--rows-per-file", "10"]


def cli(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def check_embed_output(world, out: Path):
    from contracts.vectors import read_vectors

    v = read_vectors(str(out), kind="embeddings")
    ids = list(v.image_ids)
    assert len(ids) == len(set(ids)), "duplicate rows"
    assert set(ids) == world["good"], "missing or extra rows"
    errors = {r["image_id"]: r["reason"] for r in pq.read_table(out / "_errors.parquet").to_pylist()}
    bad = {k.split("bad-", 1)[1]: v for k, v in errors.items() if "bad-" in k}
    assert set(bad) == set(bad_images())
    assert bad["empty.jpg"] == "empty image bytes"
    assert all(r.startswith("undecodable image") for k, r in bad.items() if k != "empty.jpg"), bad
    assert errors[world["cut"]].startswith("unreadable shard")
    summary = json.loads((out / "_embed.json").read_text())
    assert summary["embedded"] == len(world["good"]) and summary["errors"] == len(errors)
    return v


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_embed_killed_mid_run_then_rerun_and_disk_full(world, tmp_path, capsys, ray_module):
    from pipelines import embed

    out = tmp_path / "emb"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen([sys.executable, "-c", SLOW_EMBED, str(REPO), *embed_args(world, out), "--num-cpus", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                         start_new_session=True)
    seen, deadline = [], time.monotonic() + 240
    try:
        for line in p.stdout:
            if line.startswith("PART-WRITE"):
                seen.append(int(line.split()[1]))
                if len(seen) >= 2:
                    break
            assert time.monotonic() < deadline, "embed never wrote a part"
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and every Ray process it started
        p.wait(timeout=30)
    assert len(seen) >= 2 and 0 < seen[-1] < len(world["good"]), seen
    # nothing half-written where the output is expected; the partial work sits in a temp dir
    assert not out.exists()
    assert leftovers(tmp_path) and all(n.startswith(".tmp-emb-") for n in leftovers(tmp_path))

    # the re-run (same command, embedded Ray in this process) ends complete and exact
    code, _, err = cli(embed.main, embed_args(world, out), capsys)
    assert code == 0, err
    v = check_embed_output(world, out)
    assert len(v) == len(world["good"])

    # a full disk while the next run writes its parts: the finished output above is intact
    before = tree(out)
    pq_writer = pq.ParquetWriter
    try:
        pq.ParquetWriter = FullParquetWriter
        code, _, err = cli(embed.main, embed_args(world, out), capsys)
    finally:
        pq.ParquetWriter = pq_writer
    assert code == 2 and "No space left on device" in err.strip().splitlines()[-1], err
    assert tree(out) == before


def write_raw_embeddings(path, x, item_ids, model="m1"):
    from contracts.vectors import embeddings_schema

    n = len(x)
    sch = embeddings_schema(x.shape[1], model)
    t = pa.Table.from_arrays(
        [pa.array([f"i{i}" for i in range(n)]), pa.array(item_ids, pa.string()),
         pa.array([1] * n, pa.int32()), pa.array(["gallery"] * n),
         pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).reshape(-1)), x.shape[1])],
        schema=pa.schema([f.with_nullable(True) for f in sch], metadata=sch.metadata))
    pq.write_table(t, path)
    return path


def test_centroids_bad_vectors_and_disk_full(tmp_path, capsys, ray_module):
    from pipelines import centroids
    from tests.index.index_data import clustered, write_vectors

    good = tmp_path / "good.parquet"
    write_vectors(good, clustered(30, 8))
    out = tmp_path / "cent"
    assert cli(centroids.main, ["--embeddings", good, "--out", out], capsys)[0] == 0
    before = tree(out)

    x = clustered(6, 8)
    inf = x.copy()
    inf[2, 3] = np.inf
    cases = {
        "inf": (write_raw_embeddings(tmp_path / "inf.parquet", inf, ["a"] * 6), "NaN or inf"),
        "null item": (write_raw_embeddings(tmp_path / "null.parquet", x, ["a", None] * 3), "item_id"),
        "unnormalised": (write_raw_embeddings(tmp_path / "big.parquet", 3 * x, ["a"] * 6), "normalised"),
    }
    for name, (path, needle) in cases.items():
        code, _, err = cli(centroids.main, ["--embeddings", path, "--out", out], capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and needle in last, (name, err[-500:])
        assert "Traceback" not in err.split("error: ")[-1]
        assert tree(out) == before, name

    pq_writer = pq.ParquetWriter
    try:
        pq.ParquetWriter = FullParquetWriter
        code, _, err = cli(centroids.main, ["--embeddings", good, "--out", out], capsys)
    finally:
        pq.ParquetWriter = pq_writer
    assert code == 2 and "No space left on device" in err.strip().splitlines()[-1], err
    assert tree(out) == before and leftovers(tmp_path) == []



def test_centroids_refuses_files_of_two_models(tmp_path, capsys, ray_module):
    from pipelines import centroids
    from tests.index.index_data import clustered, write_vectors

    (tmp_path / "mixed").mkdir()
    write_vectors(tmp_path / "mixed" / "a.parquet", clustered(6, 8), prefix="a")
    write_vectors(tmp_path / "mixed" / "b.parquet", clustered(6, 8), prefix="b", model="m2")
    code, _, err = cli(centroids.main, ["--embeddings", tmp_path / "mixed", "--out", tmp_path / "c"], capsys)
    assert code == 2 and "files disagree" in err.strip().splitlines()[-1], err[-300:]
    assert not (tmp_path / "c").exists()
