"""The pipeline's URI paths against a real S3-compatible server (moto on 127.0.0.1): shards,
model, embeddings, centroids, query results and the evaluation report all live in the bucket,
equal a local run of the same inputs, and nothing is written to a local folder named 's3:'."""
import glob
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from tests.cluster.s3_server import list_keys, s3_server

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as b:
        yield b


@pytest.mark.slow
def test_pipeline_outputs_in_s3_equal_local_run(bucket, tmp_path, monkeypatch, ray_local):
    from contracts.results import read_results
    from contracts.vectors import read_vectors
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model
    from pipelines import (
        build_index,
        centroids,
        embed,
        evaluate,
        make_shards,
        make_synthetic,
        query,
    )

    monkeypatch.chdir(tmp_path)
    s3 = f"s3://{bucket}"
    assert make_synthetic.main(["--items", "6", "--images-per-item", "4", "--cameras", "2",
                                "--size", "32x16", "--out", "data", "--workers", "1"]) == 0
    assert make_shards.main(["--format", "market1501", "--root", "data", "--out", f"{s3}/shards",
                             "--shard-size", "8", "--workers", "1"]) == 0
    assert any(k.endswith(".tar") for k in list_keys(bucket, "shards/"))
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    net = build_model(cfg).eval()
    save_model(net, cfg, f"{s3}/model")
    save_model(net, cfg, "model")
    (tmp_path / "shards_local").mkdir()
    pafs.copy_files(f"{s3}/shards", str(tmp_path / "shards_local"),
                    destination_filesystem=pafs.LocalFileSystem())

    assert embed.main(["--model", f"{s3}/model", "--shards", f"{s3}/shards/shards", "--out",
                       f"{s3}/emb", "--batch-size", "8", "--threads", "1", "--actors", "1"]) == 0
    assert centroids.main(["--embeddings", f"{s3}/emb", "--split", "gallery",
                           "--out", f"{s3}/cents"]) == 0
    # the same later stages on local copies of the inputs: the reference run
    for d in ("emb", "cents"):
        (tmp_path / "local" / d).mkdir(parents=True)
        pafs.copy_files(f"{s3}/{d}", str(tmp_path / "local" / d),
                        destination_filesystem=pafs.LocalFileSystem())
    for root in (s3, "local"):
        # index roots need an atomic rename: they stay local (a URI root is refused in one line)
        name = "s3" if root == s3 else "local"
        assert build_index.main(["--vectors", f"{root}/cents/centroids.parquet", "--root", "indexes",
                                 "--name", name, "--version", "v1"]) == 0
        assert query.main(["--index", f"indexes/{name}", "--queries", f"{root}/emb", "--split", "query",
                           "--k", "5", "--out", f"{root}/results"]) == 0
        assert evaluate.main(["--results", f"{root}/results", "--query", f"{root}/emb",
                              "--query-split", "query", "--gallery-labels", f"{root}/emb",
                              "--gallery-split", "gallery", "--out", f"{root}/report.json"]) == 0

    # embeddings read back from S3 equal the model run directly on every image of the shards
    from model.embedding import ModelRunner
    from model.shards import iter_shard_samples

    got = read_vectors(f"{s3}/emb", kind="embeddings")
    samples = [s for u in sorted(glob.glob("shards_local/shards/*.tar")) for s in iter_shard_samples(u)]
    runner = ModelRunner("model", device="cpu", threads=1, decode_threads=1)
    ref = runner.embed_images([s[1] for s in samples])
    ref_by_id = {s[3]["image_id"]: e for s, e in zip(samples, ref.embeddings)}
    assert sorted(got.image_ids) == sorted(ref_by_id) and len(ref_by_id) == 26
    for i, e in zip(got.image_ids, got.vectors):
        assert np.abs(e - ref_by_id[i]).max() < 1e-5
    ca = read_vectors(f"{s3}/cents/centroids.parquet", kind="centroids")
    assert sorted(ca.item_ids) == sorted(set(got.item_ids[got.table.column("split").to_numpy(
        zero_copy_only=False) == "gallery"]))
    ra, rb = read_results(f"{s3}/results"), read_results("local/results")
    assert ra.num_rows > 0
    assert ra.column("query_id").to_pylist() == rb.column("query_id").to_pylist()
    assert ra.column("item_id").to_pylist() == rb.column("item_id").to_pylist()
    fs, p = pafs.FileSystem.from_uri(f"{s3}/report.json")
    with fs.open_input_stream(p) as f:
        assert json.loads(f.read()) == json.loads(Path("local/report.json").read_text())
    assert not any("s3:" in n for _, dirs, files in os.walk(tmp_path) for n in dirs + files)
    assert [k for k in list_keys(bucket) if ".tmp-" in k] == []


@pytest.mark.slow
def test_uri_index_root_refused_in_one_line(bucket, tmp_path, capsys):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(repo / "pipelines" / "build_index.py"), "--vectors",
                        f"s3://{bucket}/nothing.parquet", "--root", f"s3://{bucket}/indexes",
                        "--name", "x"], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "s3:").exists()
