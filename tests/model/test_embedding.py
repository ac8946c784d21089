"""Per-batch embedding logic without Ray: decode, preprocess, forward, normalise, carry-over."""
import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")

from contracts.keys import row_keys
from model import embedding as E


def jpeg(seed: int, size=(16, 32)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model

    torch.manual_seed(0)
    # the plain forward (test-time flip is tested in test_flip_test.py)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16), flip_test=False)
    net = build_model(cfg).eval()
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(net, cfg, str(d))
    return str(d)


def rows(n, item="1", cam=1):
    return [{"image_id": f"img{i}.jpg", "item_id": item, "camera_id": cam, "split": "gallery"} for i in range(n)]


def test_content_hash_is_sha256():
    b = jpeg(0)
    assert E.content_hash(b) == hashlib.sha256(b).hexdigest()


def test_decode_or_reason_records_corrupt_bytes():
    from model.transforms import decode_image

    img, reason = E.decode_or_reason(jpeg(1), decode_image)
    assert reason is None and img.mode == "RGB"
    img, reason = E.decode_or_reason(b"\xff\xd8 not really a jpeg", decode_image)
    assert img is None and "undecodable" in reason
    assert E.decode_or_reason(b"", decode_image)[1] == "empty image bytes"


def test_runner_matches_plain_forward_and_skips_corrupt(tiny_model):
    from model.checkpoint import load_model
    from model.transforms import decode_image, eval_transform

    runner = E.ModelRunner(tiny_model, device="cpu", threads=1, decode_threads=2)
    images = [jpeg(2), b"garbage", jpeg(3), jpeg(4)]
    res = runner.embed_images(images)
    assert res.ok.tolist() == [True, False, True, True]
    assert res.reasons[0] is None and "undecodable" in res.reasons[1]
    assert np.allclose(res.embeddings[1], 0)
    assert np.allclose(np.linalg.norm(res.embeddings[res.ok], axis=1), 1, atol=1e-5)
    # reference: the model applied image by image, normalised with numpy
    net, cfg, _ = load_model(tiny_model)
    tf = eval_transform(cfg)
    for i in (0, 2, 3):
        with torch.no_grad():
            y = net(tf(decode_image(images[i]))[None]).numpy()[0]
        assert np.allclose(res.embeddings[i], y / np.linalg.norm(y), atol=1e-5)
    assert runner.model_id == load_model(tiny_model)[2]


def test_mark_carried_matches_full_row_key():
    imgs = [jpeg(5), jpeg(6), jpeg(7)]
    t = E.sample_table(rows(3), imgs)
    prev = np.sort(row_keys(t.slice(0, 2)))
    # image 1 changed bytes, image 2 is new: only image 0 is carried
    t2 = E.sample_table(rows(3), [imgs[0], jpeg(60), imgs[2]])
    m = E.mark_carried(t2, prev)
    assert m.column("carry").to_pylist() == [True, False, False]
    assert m.column("image").to_pylist()[0] == b""
    # a relabelled image (same bytes, other item) is not carried either
    t3 = E.sample_table(rows(1, item="2"), imgs[:1])
    assert E.mark_carried(t3, prev).column("carry").to_pylist() == [False]


def test_embed_sample_table_nulls_carried_and_errors(tiny_model):
    runner = E.ModelRunner(tiny_model, device="cpu", threads=1, decode_threads=1)
    imgs = [jpeg(8), b"bad", jpeg(9), b""]
    t = E.sample_table(rows(4), imgs, [None, None, None, "unreadable file: x"])
    t = t.set_column(t.schema.get_field_index("carry"), "carry", pa.array([False, False, True, False]))
    out = E.embed_sample_table(runner, t)
    assert out.schema == E.embedded_schema(runner.dim)
    emb = out.column("embedding")
    assert [v is not None for v in emb.to_pylist()] == [True, False, False, False]
    errs = out.column("error").to_pylist()
    assert errs[0] is None and errs[2] is None and "undecodable" in errs[1] and errs[3] == "unreadable file: x"
    assert out.column("carry").to_pylist() == [False, False, True, False]
    assert out.column("content_hash").to_pylist() == t.column("content_hash").to_pylist()


def test_decoded_in_the_reading_tasks_gives_the_same_rows(tiny_model):
    """decode_samples (the embed job's reading tasks) then embed_sample_table: the same
    embeddings and error reasons as decoding in the model actor, and no encoded bytes travel on."""
    runner = E.ModelRunner(tiny_model, device="cpu", threads=1, decode_threads=1)
    imgs = [jpeg(11), b"bad", jpeg(12), b"", jpeg(13, size=(40, 70))]
    t = E.sample_table(rows(5), imgs, [None, None, None, "unreadable file: x", None])
    t = t.set_column(t.schema.get_field_index("carry"), "carry", pa.array([False, False, True, False, False]))
    want = E.embed_sample_table(runner, t)
    decoded = E.decode_samples(t, tuple(runner.cfg.input_size), threads=2)
    assert decoded.column("image").to_pylist() == [b""] * 5
    assert [len(b) for b in decoded.column("pixels").to_pylist()] == [32 * 16 * 3, 0, 0, 0, 32 * 16 * 3]
    assert "undecodable" in decoded.column("read_error").to_pylist()[1]
    got = E.embed_sample_table(runner, decoded)
    assert got.column("error").to_pylist() == want.column("error").to_pylist()
    assert got.column("carry").to_pylist() == want.column("carry").to_pylist()
    assert got.column("content_hash").to_pylist() == t.column("content_hash").to_pylist()
    a, b = want.column("embedding").to_pylist(), got.column("embedding").to_pylist()
    assert [v is not None for v in b] == [True, False, False, False, True]
    for x, y in zip(a, b):
        assert (x is None and y is None) or np.allclose(x, y, atol=1e-6)


def test_pixels_made_for_another_input_size_are_refused(tiny_model):
    runner = E.ModelRunner(tiny_model, device="cpu", threads=1, decode_threads=1)
    decoded = E.decode_samples(E.sample_table(rows(1), [jpeg(14)]), (64, 32))
    with pytest.raises(ValueError, match="the model's input size"):
        E.embed_sample_table(runner, decoded)
    with pytest.raises(ValueError, match="the model wants"):
        runner.embed_pixels([np.zeros((64, 32, 3), np.uint8)])


def test_manifest_sample_table_reports_missing_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(10))
    r = [{"image_id": "a.jpg", "item_id": "1", "camera_id": None, "split": "gallery", "path": "a.jpg"},
         {"image_id": "b.jpg", "item_id": "1", "camera_id": None, "split": "gallery", "path": "b.jpg"}]
    t = E.manifest_sample_table(r, str(tmp_path))
    errs = t.column("read_error").to_pylist()
    assert errs[0] is None and errs[1].startswith("unreadable file")
    assert t.column("camera_id").null_count == 2


def test_frozen_cpu_model_matches_eager(tiny_model):
    from model.checkpoint import load_model

    net, cfg, _ = load_model(tiny_model)
    frozen = E.prepare_model(net, "cpu", tuple(cfg.input_size), freeze=True)
    assert isinstance(frozen, torch.jit.ScriptModule)
    x = torch.randn(5, 3, *cfg.input_size)  # another batch size than the one traced
    want = E.forward_embeddings(net.eval(), x, "cpu")
    np.testing.assert_allclose(E.forward_embeddings(frozen, x, "cpu"), want, atol=1e-5)
    assert E.prepare_model(net, "cpu", tuple(cfg.input_size), freeze=False) is net


def test_frozen_rmac_model_is_traced_without_warnings():
    import warnings

    from model.config import ModelConfig
    from model.net import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16), pooling="rmac", flip_test=False)
    net = build_model(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # the job's stderr stays readable
        frozen = E.prepare_model(net, "cpu", tuple(cfg.input_size))
    assert isinstance(frozen, torch.jit.ScriptModule)  # frozen, not the eager fallback
    x = torch.randn(4, 3, *cfg.input_size)
    np.testing.assert_allclose(E.forward_embeddings(frozen, x, "cpu"),
                               E.forward_embeddings(net, x, "cpu"), atol=1e-5)


def test_untraceable_model_falls_back_to_eager_and_says_so(capsys):
    class Branchy(torch.nn.Module):  # shape-dependent control flow: the trace bakes in one branch
        def forward(self, x):
            return x.mean(dim=(2, 3)) * (2.0 if x.shape[0] == 1 else 1.0) + 1.0

    net = Branchy()
    assert E.prepare_model(net, "cpu", (8, 4)) is net
    assert "using the eager model" in capsys.readouterr().err


def test_embed_inputs_resolve_and_refuse_in_one_line(tmp_path):
    from contracts.manifest import make_manifest_table, write_manifest

    rows_ = [{"image_id": f"{s}{i}.jpg", "item_id": "1", "camera_id": None, "split": s, "path": f"{s}{i}.jpg"}
             for s in ("gallery", "query") for i in range(2)]
    write_manifest(make_manifest_table(rows_), tmp_path / "m.parquet")
    got = E.embed_inputs(manifest=str(tmp_path / "m.parquet"), root=str(tmp_path), split="query")
    assert got.urls is None and got.manifest.column("image_id").to_pylist() == ["query0.jpg", "query1.jpg"]
    assert got.what == "2 manifest row(s)"
    with pytest.raises(ValueError, match="no rows of split train"):
        E.embed_inputs(manifest=str(tmp_path / "m.parquet"), root=str(tmp_path), split="train")
    with pytest.raises(FileNotFoundError, match="--root is not a directory"):
        E.embed_inputs(manifest=str(tmp_path / "m.parquet"), root=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="needs --root"):
        E.embed_inputs(manifest=str(tmp_path / "m.parquet"))
    with pytest.raises(FileNotFoundError, match="no shards match"):
        E.embed_inputs(shards=str(tmp_path / "none-*.tar"))


def test_embed_clock_steady_rate_from_model_calls():
    ticks = iter([0.0, 1.0, 12.0, 13.0, 14.0])
    clock = E.EmbedClock(clock=lambda: next(ticks))

    def table(n, start, finish, carry=False):
        return pa.table({"carry": [carry] * n, "started": [start] * n, "finished": [finish] * n})

    assert clock.batch(table(4, 100.0, 102.0)) is False  # t=1: first batch back
    assert clock.batch(table(4, 102.0, 104.0)) is True   # t=12: a progress line is due
    assert clock.batch(table(2, 0.0, 999.0, carry=True)) is False  # carried rows: no model call
    s = clock.summary(embedded=8)
    assert s == {"seconds": 14.0, "first_batch_seconds": 1.0, "steady_images_per_second": 2.0,
                 "model_busy_fraction": 1.0}
