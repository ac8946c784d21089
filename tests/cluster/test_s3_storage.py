"""Outputs to s3:// go to a real S3-compatible server (moto, loopback), never to a local folder
named after the URI; a failed write keeps the previous output; bad URIs fail in one line."""
import os
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.s3_server import list_keys, s3_server

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as b:
        yield b


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def no_local_uri_folder(root):
    return not any("s3:" in name for _, dirs, files in os.walk(root) for name in dirs + files)


def test_atomic_dir_uploads_to_s3_and_replaces_previous(bucket, in_tmp):
    from contracts.storage import atomic_dir

    with atomic_dir(f"s3://{bucket}/emb") as tmp:
        Path(os.path.join(tmp, "part-00000.parquet")).write_text("one")
        Path(os.path.join(tmp, "old-only.txt")).write_text("x")
    assert list_keys(bucket, "emb/") == ["emb/old-only.txt", "emb/part-00000.parquet"]
    with atomic_dir(f"s3://{bucket}/emb") as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        Path(os.path.join(tmp, "sub", "part-00001.parquet")).write_text("two")
    # the new output replaces the old one wholly; no temporary prefix is left behind
    assert list_keys(bucket, "emb") == ["emb/sub/part-00001.parquet"]
    assert [k for k in list_keys(bucket) if ".tmp-" in k] == []
    assert no_local_uri_folder(in_tmp)


def test_failed_write_keeps_previous_s3_output(bucket, in_tmp):
    from contracts.storage import atomic_dir

    with atomic_dir(f"s3://{bucket}/keep") as tmp:
        Path(os.path.join(tmp, "a.txt")).write_text("good")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(f"s3://{bucket}/keep") as tmp:
        Path(os.path.join(tmp, "b.txt")).write_text("half")
        raise RuntimeError("boom")
    assert list_keys(bucket, "keep") == ["keep/a.txt"]
    assert [k for k in list_keys(bucket) if ".tmp-" in k] == []


def test_missing_bucket_and_bad_scheme_refused_in_one_line_before_work(bucket, in_tmp):
    from contracts.storage import StorageError, atomic_dir, write_text_atomic

    entered = []
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"), \
            atomic_dir("s3://no-such-bucket/out"):
        entered.append(1)
    assert entered == []  # refused before the job's work starts
    with pytest.raises(StorageError, match="cannot open this URI") as e:
        write_text_atomic("nosuchscheme://x/y.json", "{}")
    assert "\n" not in str(e.value)
    assert no_local_uri_folder(in_tmp)


def test_unreachable_endpoint_one_line(bucket, in_tmp, monkeypatch):
    import socket

    from contracts.storage import StorageError, check_writable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match="cannot reach the storage") as e:
        check_writable(f"s3://{bucket}/x")
    assert "\n" not in str(e.value)


def test_model_saved_to_s3_replaces_previous_and_loads(bucket, in_tmp):
    from model.checkpoint import load_model, save_model
    from model.config import ModelConfig
    from model.net import build_model

    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    torch.manual_seed(0)
    a = build_model(cfg).eval()
    torch.manual_seed(1)
    b = build_model(cfg).eval()
    uri = f"s3://{bucket}/models/ctl"
    id_a = save_model(a, cfg, uri)
    id_b = save_model(b, cfg, uri)  # before: the directory move failed after deleting model a
    assert id_a != id_b
    assert list_keys(bucket, "models/") == ["models/ctl/config.json", "models/ctl/model.pt"]
    net, _, mid = load_model(uri)
    assert mid == id_b
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.allclose(net(x), b(x))
    assert no_local_uri_folder(in_tmp)


def test_results_and_vectors_round_trip_through_s3(bucket, in_tmp):
    from contracts.results import make_results_table, read_results, write_results
    from contracts.vectors import make_embeddings_table, read_vectors, write_table_atomic

    t = make_results_table(["q0", "q1"], np.array([["a", "b"], ["b", "a"]], dtype=object), None,
                           np.array([[0.9, 0.1], [0.8, 0.2]], dtype=np.float32))
    write_results(t, f"s3://{bucket}/results")  # before: refused ("local/mounted path")
    assert read_results(f"s3://{bucket}/results").equals(read_results_local(t, in_tmp))
    x = np.eye(3, 4, dtype=np.float32)
    e = make_embeddings_table(["i0", "i1", "i2"], np.array(["0", "0", "1"], dtype=object),
                              [1, 2, 1], np.array(["gallery"] * 3), x, "m")
    write_table_atomic(e, f"s3://{bucket}/emb1/part-0.parquet")
    v = read_vectors(f"s3://{bucket}/emb1", kind="embeddings")
    assert list(v.image_ids) == ["i0", "i1", "i2"] and np.array_equal(v.vectors, x)
    assert no_local_uri_folder(in_tmp)


def read_results_local(t, d):
    from contracts.results import read_results, write_results

    write_results(t, str(d / "local_results"))
    return read_results(str(d / "local_results"))
