"""Faults of the image/model side (issue 14, cases 4, 5, 6, 10, 11, 13, 14, 15): every one with
a tiny model and images made here, no Ray.

- 4: the model id covers config.json, so the same weights with another input_size are another
  model: incremental embedding carries nothing over and evaluation refuses the mix;
- 5: every image mode is converted faithfully (16-bit, float, alpha, palette, CMYK, ...) or
  refused with a reason, at embed and at make_shards;
- 6, 13: a NaN mean or a 100000x100000 input_size in config.json is a one-line error;
- 10: one shard sample with bad JSON is an error row of its own, the rest of the shard is kept;
- 11: report pictures never open a path outside the dataset root;
- 14: EXIF orientation is applied (embed, make_shards --resize);
- 15: a manifest row that is a symlink out of the root is rejected alone.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines._cli import run_main
from tests.faults.images import jpeg

torch = pytest.importorskip("torch")


def encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def cli(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(module.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.net import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", input_size=(32, 16))
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(build_model(cfg).eval(), cfg, str(d))
    return str(d)


@pytest.fixture(scope="module")
def runner(tiny_model):
    from model.embedding import ModelRunner

    return ModelRunner(tiny_model, device="cpu", threads=1, freeze=False)


def with_config(model_dir: str, dest, **changes) -> str:
    """A copy of model_dir (the same model.pt bytes) whose config.json has `changes`."""
    dest = str(dest)
    shutil.copytree(model_dir, dest)
    path = os.path.join(dest, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        f.write(json.dumps(cfg))  # json writes NaN for float("nan"), as a hand edit would
    return dest


# ---- 4: the model id ---------------------------------------------------------------------

def test_model_id_covers_the_config_and_incremental_embed_carries_nothing(tiny_model, tmp_path):
    from model.checkpoint import load_model
    from pipelines import evaluate
    from pipelines.reindex import embed_local, model_identity

    other = with_config(tiny_model, tmp_path / "other", input_size=[64, 32])
    reformatted = with_config(tiny_model, tmp_path / "same", input_size=[32, 16])  # same values
    ids = {d: load_model(d)[2] for d in (tiny_model, other, reformatted)}
    assert ids[tiny_model] != ids[other], "same weights, other input size: must be another model"
    assert ids[tiny_model] == ids[reformatted], "the id depends on the config's values, not its text"
    from model.checkpoint import read_model_id

    for d in (tiny_model, other):  # every door computes the same id
        assert read_model_id(d) == model_identity(d) == ids[d]

    root = tmp_path / "data"
    rows = []
    for i in range(4):
        rel = f"g/{i}.jpg"
        (root / "g").mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg(i))
        rows.append({"image_id": rel, "item_id": str(i // 2), "camera_id": i % 2 + 1,
                     "split": "query" if i % 2 else "gallery", "path": rel})
    manifest = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image_id", pa.string()), ("item_id", pa.string()), ("camera_id", pa.int32()),
        ("split", pa.string()), ("path", pa.string())]))
    first = embed_local(manifest, str(root), tiny_model, None, str(tmp_path / "e1"))
    again = embed_local(manifest, str(root), tiny_model, str(tmp_path / "e1"), str(tmp_path / "e1b"))
    assert again["carried"] == 4 and again["embedded"] == 0  # the same model still carries
    second = embed_local(manifest, str(root), other, str(tmp_path / "e1"), str(tmp_path / "e2"))
    assert (first["model"], second["model"]) == (ids[tiny_model], ids[other])
    assert second["carried"] == 0 and second["embedded"] == 4

    # old queries against the new gallery: refused, not scored
    with pytest.raises(ValueError, match="come from model"):
        evaluate.main(["--query", str(tmp_path / "e1"), "--query-split", "query",
                       "--gallery", str(tmp_path / "e2"), "--gallery-split", "gallery",
                       "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


# ---- 6, 13: bad model configs ----------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"mean": [float("nan"), 0.456, 0.406]}, "config model.mean: expected a finite number, got nan"),
    ({"mean": [123.7, 116.3, 103.5]}, "mean must be 3 finite values in [0, 1]"),
    ({"std": [0.229, float("inf"), 0.225]}, "finite number"),
    ({"std": [0.229, -0.1, 0.225]}, "std must be 3 finite values > 0"),
    ({"input_size": [100000, 100000]}, "input_size must be (H, W) with both in [16, 4096]"),
    ({"gem_p": float("nan")}, "finite number"),
])
def test_bad_config_json_is_a_one_line_error(tiny_model, tmp_path, capsys, changes, message):
    from model.checkpoint import load_model
    from pipelines import embed

    bad = with_config(tiny_model, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match="bad config.json") as e:
        load_model(bad)
    assert message in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "shards").mkdir()
    code, _, err = cli(embed, ["--model", bad, "--shards", str(tmp_path / "shards"),
                               "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: bad config.json"), err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_model_config_itself_refuses_nan_mean_and_huge_input():
    from model.config import ModelConfig

    with pytest.raises(ValueError, match="mean must be 3 finite values"):
        ModelConfig(backbone="resnet18", mean=(float("nan"), 0.5, 0.5))
    with pytest.raises(ValueError, match="std must be 3 finite values > 0"):
        ModelConfig(backbone="resnet18", std=(float("nan"), 0.5, 0.5))
    with pytest.raises(ValueError, match="input_size"):
        ModelConfig(backbone="resnet18", input_size=(100000, 100000))


def test_make_shards_resize_is_bounded(tmp_path, capsys):
    from pipelines import make_shards

    (tmp_path / "R" / "1").mkdir(parents=True)
    (tmp_path / "R" / "1" / "a.jpg").write_bytes(jpeg(1))
    code, _, err = cli(make_shards, ["--format", "folders", "--root", str(tmp_path / "R"),
                                     "--out", str(tmp_path / "O"), "--resize", "100000x100000"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--resize must be HxW with both in [1, 4096]" in err, err
    assert not (tmp_path / "O").exists()


# ---- 5, 14: image modes and orientation ------------------------------------------------------

def gradient16() -> np.ndarray:
    """(48, 24) uint16 grey gradient over the whole 16-bit range."""
    return np.linspace(0, 65535, 48 * 24).reshape(48, 24).astype(np.uint16)


def mode_cases():
    """name -> (encoded bytes, expected (H, W, 3) uint8 pixels)."""
    from PIL import Image

    g16 = gradient16()
    g8 = np.rint(g16 / 257.0).astype(np.uint8)
    grey = np.repeat(g8[..., None], 3, axis=2)
    rgb = np.random.default_rng(0).integers(0, 256, (48, 24, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.zeros((48, 24, 1), np.uint8)], axis=2)
    rgba[:24, :, 3] = 255  # top half opaque, bottom half fully transparent -> white
    want_rgba = rgb.copy()
    want_rgba[24:] = 255
    pal = Image.fromarray(rgb).quantize(16)
    pal_rgb = np.asarray(pal.convert("RGB"))
    want_pal = pal_rgb.copy()
    want_pal[np.asarray(pal) == 0] = 255
    la = np.stack([g8, np.where(np.arange(48)[:, None] < 24, 255, 0).repeat(24, 1).astype(np.uint8)], 2)
    want_la = grey.copy()
    want_la[24:] = 255
    bits = (g8 > 127)
    return {
        "png I;16": (encode(Image.fromarray(g16), "PNG"), grey),
        "tiff I;16": (encode(Image.fromarray(g16), "TIFF"), grey),
        "pgm 16-bit (I)": (encode(Image.fromarray(g16), "PPM"), grey),
        "tiff I (32-bit int)": (encode(Image.fromarray(g16.astype(np.int32)), "TIFF"), grey),
        "tiff F in [0, 1]": (encode(Image.fromarray((g16 / 65535.0).astype(np.float32)), "TIFF"), grey),
        "png RGBA": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), want_rgba),
        "png P + transparency": (encode(pal, "PNG", transparency=0), want_pal),
        "png LA": (encode(Image.fromarray(la, "LA"), "PNG"), want_la),
        "png 1-bit": (encode(Image.fromarray(bits), "PNG"), np.repeat(bits[..., None] * 255, 3, 2).astype(np.uint8)),
        "tiff CMYK": (encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"),
                      np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))),
    }


@pytest.mark.parametrize("name", list(mode_cases()))
def test_every_mode_is_converted_faithfully_at_embed_and_make_shards(name):
    from model.ingest import check_image
    from model.transforms import decode_image

    data, want = mode_cases()[name]
    got = np.asarray(decode_image(data))
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= 1, name
    res = check_image(data)  # make_shards: kept, and its stored bytes decode to the same pixels
    assert res.ok, res.reason
    assert np.abs(np.asarray(decode_image(res.data)).astype(int) - want).max() <= 1, name


@pytest.mark.parametrize("pixels, reason", [
    (np.full((8, 8), -3.0, np.float32), "float image pixels in [-3, -3]"),
    (np.full((8, 8), 1e6, np.float32), "expected [0, 1] or [0, 255]"),
    (np.full((8, 8), np.nan, np.float32), "NaN or infinite"),
    (np.full((8, 8), 70000, np.int32), "expected 0..65535"),
])
def test_unconvertible_pixels_are_refused_with_a_reason(pixels, reason, runner):
    from PIL import Image

    from model.embedding import embed_sample_table, sample_table, split_embedded
    from model.ingest import check_image

    data = encode(Image.fromarray(pixels), "TIFF")
    res = check_image(data)
    assert not res.ok and reason in res.reason, res.reason
    row = {"image_id": "x.tif", "item_id": "1", "camera_id": None, "split": "gallery"}
    good, errors, _ = split_embedded(embed_sample_table(runner, sample_table([row], [data])))
    assert good.num_rows == 0 and reason in errors.column("reason")[0].as_py()


def test_16bit_png_embeds_like_its_8bit_version(runner):
    """Before: convert('RGB') clipped 99.6% of the pixels to white and stored a white image's vector."""
    from PIL import Image

    g16 = gradient16()
    g8 = np.rint(g16 / 257.0).astype(np.uint8)
    res = runner.embed_images([encode(Image.fromarray(g16), "PNG"), encode(Image.fromarray(g8), "PNG"),
                               encode(Image.new("L", (24, 48), 255), "PNG")])
    assert res.ok.all()
    e16, e8, white = res.embeddings
    assert float(e16 @ e8) > 0.9999
    assert float(e16 @ white) < float(e16 @ e8) - 1e-3


def exif_rotated(fmt: str) -> tuple[bytes, np.ndarray]:
    """An image stored unrotated with EXIF Orientation 6 (show rotated 90 degrees clockwise),
    and the pixels it shows."""
    from PIL import Image

    yy, xx = np.mgrid[0:16, 0:32]
    raw = np.stack([xx * 8, yy * 16, 255 - xx * 8], axis=2).astype(np.uint8)  # smooth: JPEG keeps it
    raw[:6, :6] = (255, 255, 255)  # a corner marker, so the direction of the turn matters
    img = Image.fromarray(raw)
    exif = img.getexif()
    exif[0x0112] = 6
    return encode(img, fmt, exif=exif.tobytes()), np.rot90(raw, k=-1)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_at_embed_and_make_shards(fmt, runner):
    from model.ingest import CheckConfig, check_image
    from model.transforms import decode_image

    data, shown = exif_rotated(fmt)
    tol = 0.0 if fmt == "PNG" else 6.0  # JPEG is lossy; the unrotated pixels differ far more
    got = np.asarray(decode_image(data)).astype(int)
    assert got.shape == shown.shape
    assert np.abs(got - shown).mean() <= tol
    # make_shards --resize re-encodes (dropping the EXIF block): the stored pixels are upright
    res = check_image(data, CheckConfig(resize=(32, 16)))
    assert res.ok
    stored = np.asarray(decode_image(res.data)).astype(int)
    assert stored.shape == (32, 16, 3) and np.abs(stored - shown).mean() <= tol + 2
    # embed: the vector of the upright image
    from PIL import Image

    e = runner.embed_images([data, encode(Image.fromarray(shown.astype(np.uint8)), "PNG")]).embeddings
    assert float(e[0] @ e[1]) > 0.999


# ---- 10: bad sample JSON in a shard ------------------------------------------------------------

def shard_with_bad_samples(path) -> list[str]:
    """A shard of 6 samples: 3 good, then 'no image_id', 'camera_id abc', broken JSON, a list,
    interleaved; returns the good image ids."""
    from model.shards import key_for

    good = {"image_id": "g/0.jpg", "item_id": "1", "camera_id": 1, "split": "gallery", "path": "g/0.jpg"}
    samples = [
        ("g/0.jpg", json.dumps(good)),
        ("g/1.jpg", json.dumps({k: v for k, v in good.items() if k != "image_id"})),
        ("g/2.jpg", json.dumps({**good, "image_id": "g/2.jpg", "camera_id": "abc"})),
        ("g/3.jpg", json.dumps({**good, "image_id": "g/3.jpg"})),
        ("g/4.jpg", '{"image_id": "g/4.jpg", '),
        ("g/5.jpg", "[1, 2]"),
        ("g/6.jpg", json.dumps({**good, "image_id": "g/6.jpg", "camera_id": None})),
    ]
    with tarfile.open(path, "w") as t:
        for i, (image_id, text) in enumerate(samples):
            for ext, data in (("jpg", jpeg(i)), ("json", text.encode())):
                info = tarfile.TarInfo(f"{key_for(image_id)}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return ["g/0.jpg", "g/3.jpg", "g/6.jpg"]


def test_bad_sample_json_is_an_error_row_and_the_shard_goes_on(tiny_model, tmp_path):
    from model.embedding import EmbedBatch, samples_from_shards, split_embedded
    from model.sampler import ShardIndexWarning, index_shards

    url = str(tmp_path / "gallery-000000.tar")
    want = shard_with_bad_samples(url)
    stage = EmbedBatch(tiny_model, device="cpu", threads=1, freeze=False)
    good, errors = [], {}
    for t in samples_from_shards([url]):
        ok, errs, _ = split_embedded(stage(t))
        good += ok.column("image_id").to_pylist()
        errors.update(zip(errs.column("image_id").to_pylist(), errs.column("reason").to_pylist()))
    assert good == want
    assert set(errors) == {"g/1.jpg", "g/2.jpg", "g/4.jpg", "g/5.jpg"}, errors
    assert "image_id missing" in errors["g/1.jpg"]  # named by its key
    assert "camera_id 'abc' is not an int32" in errors["g/2.jpg"]
    assert errors["g/4.jpg"].startswith("bad JSON") and "not an object" in errors["g/5.jpg"]
    assert all("\n" not in r and "\x1b" not in r for r in errors.values())
    # the training index: the same samples left out, with a warning, the others indexed
    with pytest.warns(ShardIndexWarning, match="left out"):
        index = index_shards([url])
    assert list(index.image_id) == want


# ---- 11: evaluate --images stays inside the dataset root --------------------------------------

def test_report_pictures_never_open_paths_outside_the_root(tmp_path, capsys):
    from PIL import Image

    from pipelines._images import image_reader

    root = tmp_path / "data"
    (root / "g").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    secret = tmp_path / "secret" / "secret.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(secret)
    (root / "g" / "ok.png").write_bytes(encode(Image.fromarray(gradient16()), "PNG"))
    os.symlink(tmp_path / "secret", root / "link")
    manifest = tmp_path / "manifest.parquet"
    ids = ["g/ok.png", "rel", "abs", "sym"]
    pq.write_table(pa.table({"image_id": ids,
                             "path": ["g/ok.png", "../secret/secret.png", str(secret), "link/secret.png"]}),
                   manifest)
    read = image_reader(str(manifest), str(root), ids)
    assert [read(i) for i in ids[1:]] == [None, None, None]
    ok = read("g/ok.png")  # the one decoder: a 16-bit PNG as 8-bit RGB, not clipped to white
    assert ok is not None and ok.mode == "RGB" and np.asarray(ok).max() == 255 and np.asarray(ok).min() == 0
    err = capsys.readouterr().err
    assert "leaves the dataset root" in err and "absolute" in err and "resolves outside" in err
    # a dataset root: the image_id is the path
    read_root = image_reader(str(root), None, ["../secret/secret.png", "link/secret.png"])
    assert read_root("../secret/secret.png") is None and read_root("link/secret.png") is None
    assert read_root("g/ok.png") is not None


# ---- 15: a manifest row that is a symlink out of the root -------------------------------------

def test_manifest_row_symlinked_out_of_root_is_rejected_alone(tmp_path, capsys):
    from pipelines import make_shards

    root = tmp_path / "R"
    (root / "img").mkdir(parents=True)
    for i in range(4):
        (root / "img" / f"{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.jpg").write_bytes(jpeg(9))
    os.symlink(tmp_path / "outside" / "x.jpg", root / "img" / "link.jpg")
    (root / "m.csv").write_text("path,item_id\n" + "".join(f"img/{i}.jpg,{i // 2 + 1}\n" for i in range(4))
                                + "img/link.jpg,2\n../outside/x.jpg,2\n")
    code, _out, err = cli(make_shards, ["--format", "manifest", "--root", str(root), "--manifest",
                                       str(root / "m.csv"), "--out", str(tmp_path / "O")], capsys)
    assert code == 0, err
    rejected = dict(zip(*pq.read_table(tmp_path / "O" / "rejected.parquet").to_pydict().values()))
    assert "resolves outside the dataset root" in rejected["img/link.jpg"]
    assert "leaves the dataset root" in rejected["../outside/x.jpg"]
    assert pq.read_table(tmp_path / "O" / "manifest.parquet").column("path").to_pylist() == \
        [f"img/{i}.jpg" for i in range(4)]
