import io
import os
import struct
import warnings
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from contracts.manifest import read_manifest
from model.ingest import (
    CheckConfig,
    IngestError,
    PathEscapeError,
    assign_splits,
    build_dataset,
    check_file,
    check_image,
    parse_hw,
    parse_market_name,
    safe_relpath,
    scan_dataset,
    scan_folders,
    scan_manifest,
    scan_market1501,
)
from model.shards import iter_shard_samples, key_for, list_shards


def encoded(fmt="JPEG", size=(16, 32), colour=(120, 60, 200)):
    rng = np.random.default_rng(sum(colour))
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    arr[..., 0] = colour[0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def png_header_only(width, height):
    """A PNG whose IHDR claims width x height (a decompression bomb's header)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- names and image checks

@pytest.mark.parametrize("name, expected", [
    ("0002_c1s1_000451_03.jpg", ("2", 1)),
    ("0002_c1s1_000451_03.jpg.jpg", ("2", 1)),
    ("-1_c3s2_000101_01.jpg", ("-1", 3)),
    ("0000_c6s1_000376_03.jpg", ("0", 6)),
    ("1501_c5s3_015240_04.JPG", ("1501", 5)),
    ("0001_c2_f0046182.jpg", ("1", 2)),  # DukeMTMC-reID style
    ("Thumbs.db", None),
    ("0002_x1s1.jpg", None),
    ("0002_c1s1_000451_03.txt", None),
])
def test_parse_market_name(name, expected):
    assert parse_market_name(name) == expected


def test_check_image_keeps_original_bytes():
    jpg, png = encoded("JPEG"), encoded("PNG")
    assert check_image(jpg) == check_image(jpg)
    r = check_image(jpg)
    assert (r.ok, r.ext, r.data) == (True, "jpg", jpg)
    r = check_image(png)
    assert (r.ok, r.ext, r.data) == (True, "png", png)


def test_other_formats_become_lossless_png():
    bmp = encoded("BMP")
    r = check_image(bmp)
    assert r.ok and r.ext == "png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.data))),
                          np.asarray(Image.open(io.BytesIO(bmp))))


def test_resize_reencodes_to_requested_size():
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "png")):
        r = check_image(encoded(fmt, size=(20, 40)), CheckConfig(resize=(24, 12)))
        assert r.ok and r.ext == ext
        assert Image.open(io.BytesIO(r.data)).size == (12, 24)


def test_bad_images_are_rejected_with_reasons():
    jpg = encoded("JPEG", size=(64, 128))
    png = bytearray(encoded("PNG", size=(64, 128)))
    png[-20] ^= 0xFF  # flip a byte inside the IEND/IDAT region: CRC or zlib failure
    cases = {
        b"": "empty file",
        b"hello, this is text\n": "not an image",
        jpg[: len(jpg) // 2]: "cannot decode",
        bytes(png): "cannot decode",
    }
    for data, reason in cases.items():
        r = check_image(data)
        assert not r.ok and r.reason.startswith(reason), (reason, r.reason)
        assert r.data == b""


def test_pixel_limit_is_local_and_guards_bombs():
    before = Image.MAX_IMAGE_PIXELS
    r = check_image(encoded("JPEG", size=(64, 128)), CheckConfig(max_pixels=1000))
    assert not r.ok and r.reason.startswith("too large: 64x128")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        r = check_image(png_header_only(100_000, 100_000))
        assert not r.ok and r.reason.startswith("too large")
        r = check_image(png_header_only(10_000, 9_000))  # between PIL's warn and error limits
        assert not r.ok and r.reason.startswith("too large")
    assert Image.MAX_IMAGE_PIXELS == before


def test_check_file_unreadable(tmp_path):
    assert check_file(str(tmp_path / "missing.jpg")).reason.startswith("cannot read")
    assert check_file(str(tmp_path)).reason.startswith("cannot read")


def test_parse_hw():
    assert parse_hw("256x128") == (256, 128)
    for bad in ("256", "0x4", "ax4", "-1x3"):
        with pytest.raises(ValueError, match="HxW"):
            parse_hw(bad, "--resize")


# ---------------------------------------------------------------- market1501

def make_market(root, bad=True):
    files = {
        "bounding_box_train/0002_c1s1_000451_03.jpg": encoded(colour=(1, 0, 0)),
        "bounding_box_train/0002_c2s1_000551_01.jpg.jpg": encoded(colour=(2, 0, 0)),
        "bounding_box_train/0007_c3s1_000001_01.jpg": encoded(colour=(3, 0, 0)),
        "query/0001_c1s1_001051_00.jpg": encoded(colour=(4, 0, 0)),
        "query/0010_c4s1_001051_00.jpg": encoded(colour=(5, 0, 0)),
        "bounding_box_test/0001_c2s1_000301_01.jpg": encoded(colour=(6, 0, 0)),
        "bounding_box_test/0010_c6s1_000301_01.jpg": encoded(colour=(7, 0, 0)),
        "bounding_box_test/-1_c1s1_000401_03.jpg": encoded(colour=(8, 0, 0)),
        "bounding_box_test/0000_c1s1_000376_03.jpg": encoded(colour=(9, 0, 0)),
    }
    if bad:
        files.update({
            "bounding_box_test/0003_c1s1_000001_01.jpg": b"",
            "bounding_box_test/0004_c1s1_000001_01.jpg": b"<html>not an image</html>",
            "bounding_box_test/0005_c1s1_000001_01.jpg": encoded()[:150],
            "bounding_box_test/Thumbs.db": b"\x00" * 10,
            "readme.txt": b"ignored: not in a split folder",
        })
    for rel, data in files.items():
        write(root / rel, data)
    return files


def test_scan_market1501(tmp_path):
    make_market(tmp_path)
    scan = scan_market1501(str(tmp_path))
    by_id = {r["image_id"]: r for r in scan.rows}
    assert by_id["bounding_box_train/0002_c2s1_000551_01.jpg.jpg"] == {
        "image_id": "bounding_box_train/0002_c2s1_000551_01.jpg.jpg", "item_id": "2",
        "camera_id": 2, "split": "train", "path": "bounding_box_train/0002_c2s1_000551_01.jpg.jpg"}
    assert by_id["bounding_box_test/-1_c1s1_000401_03.jpg"]["item_id"] == "-1"
    assert by_id["bounding_box_test/0000_c1s1_000376_03.jpg"]["item_id"] == "0"
    assert {r["split"] for r in scan.rows if r["image_id"].startswith("query/")} == {"query"}
    assert len(scan.rows) == 12
    assert scan.rejected == [("bounding_box_test/Thumbs.db",
                              "name is not a Market-1501 image name (PPPP_cC...jpg)")]
    with pytest.raises(IngestError, match="none of the Market-1501 folders"):
        scan_market1501(str(tmp_path / "bounding_box_train"))
    with pytest.raises(FileNotFoundError):
        scan_market1501(str(tmp_path / "nope"))


def test_build_dataset_rejects_bad_files_and_writes_everything(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    files = make_market(root)
    summary = build_dataset(scan_market1501(str(root)), str(root), str(out), shard_size=2)
    assert summary.counts == {"train": 3, "query": 2, "gallery": 4}
    assert summary.items == {"train": 2, "query": 2, "gallery": 4}
    assert summary.rejected == 4
    rejected = dict(pq.read_table(out / "rejected.parquet").to_pylist()[i].values()
                    for i in range(4))
    assert rejected["bounding_box_test/0003_c1s1_000001_01.jpg"] == "empty file (0 bytes)"
    assert rejected["bounding_box_test/0004_c1s1_000001_01.jpg"].startswith("not an image")
    assert rejected["bounding_box_test/0005_c1s1_000001_01.jpg"].startswith("cannot decode")
    assert "bounding_box_test/Thumbs.db" in rejected
    manifest = read_manifest(out / "manifest.parquet")
    assert manifest.num_rows == 9
    assert set(manifest.column("image_id").to_pylist()) == {
        k for k, v in files.items() if len(v) > 200 and k != "readme.txt"}
    got = {}
    for split in ("train", "query", "gallery"):
        for key, data, ext, row in iter_shard_samples(list_shards(out, split)):
            assert row["split"] == split and ext == "jpg"
            assert key == key_for(row["image_id"])
            got[row["image_id"]] = (data, row)
    assert {k: v[1] for k, v in got.items()} == {r["image_id"]: r for r in manifest.to_pylist()}
    for image_id, (data, _) in got.items():
        assert data == files[image_id]  # original bytes, untouched


def test_build_dataset_is_deterministic_with_workers(tmp_path):
    root = tmp_path / "root"
    for i in range(90):
        write(root / "bounding_box_train" / f"{i % 9:04d}_c{i % 6 + 1}s1_{i:06d}_01.jpg",
              encoded(colour=(i, 1, 2)))
    write(root / "bounding_box_train" / "0001_c1s1_999999_01.jpg", b"broken")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        s = build_dataset(scan_market1501(str(root)), str(root), str(out), shard_size=25,
                          workers=workers)
        assert s.counts["train"] == 90 and s.rejected == 1 and s.shards == {"train": 4}
        outs.append(out)
    for rel in ["manifest.parquet", "rejected.parquet"] + [
            f"shards/train-{i:06d}.tar" for i in range(4)]:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_build_dataset_errors(tmp_path):
    root = tmp_path / "root"
    write(root / "query" / "0001_c1s1_000001_01.jpg", b"")
    scan = scan_market1501(str(root))
    with pytest.raises(IngestError, match="no readable images"):
        build_dataset(scan, str(root), str(tmp_path / "out"))
    write(root / "query" / "README", b"x")
    (root / "query" / "0001_c1s1_000001_01.jpg").unlink()
    with pytest.raises(IngestError, match="no images found"):
        build_dataset(scan_market1501(str(root)), str(root), str(tmp_path / "out"))


def test_market_mini_counts(market_mini):
    scan = scan_market1501(str(market_mini))
    assert scan.rejected == []
    counts, items, cams = {}, {}, set()
    for r in scan.rows:
        counts[r["split"]] = counts.get(r["split"], 0) + 1
        items.setdefault(r["split"], set()).add(r["item_id"])
        cams.add(r["camera_id"])
    assert counts == {"train": 2412, "query": 686, "gallery": 4000}
    assert len(items["query"]) == 150 and len(items["train"]) == 151
    assert cams == {1, 2, 3, 4, 5, 6}
    assert {"-1", "0"} <= items["gallery"] and not {"-1", "0"} & items["query"]
    assert not items["train"] & items["query"]  # disjoint identities as in Market-1501


# ---------------------------------------------------------------- folders

def test_assign_splits_deterministic():
    rows = [{"image_id": f"{item}/{j}.jpg", "item_id": item, "camera_id": None,
             "path": f"{item}/{j}.jpg"} for item in ["10", "2", "1", "3", "-1", "0"]
            for j in range(3)]
    rows.append({"image_id": "4/0.jpg", "item_id": "4", "camera_id": None, "path": "4/0.jpg"})
    out = assign_splits(rows, query_per_item=2, train_fraction=0.4)
    split = {r["image_id"]: r["split"] for r in out}
    assert len(out) == len(rows)
    # natural order 1, 2, 3, 4, 10: round(0.4 * 5) = 2 train items
    assert {i for i, s in split.items() if s == "train"} == {f"{k}/{j}.jpg" for k in "12"
                                                               for j in range(3)}
    assert [split[f"3/{j}.jpg"] for j in range(3)] == ["query", "query", "gallery"]
    assert split["4/0.jpg"] == "gallery"  # a single image cannot be a query with no match
    assert {split[f"{k}/{j}.jpg"] for k in ("-1", "0") for j in range(3)} == {"gallery"}
    assert {r["image_id"]: r["split"] for r in assign_splits(rows[::-1], 2, 0.4)} == split
    with pytest.raises(ValueError, match="train-fraction"):
        assign_splits(rows, 1, 1.5)
    with pytest.raises(ValueError, match="query-per-item"):
        assign_splits(rows, -1, 0.5)


def test_scan_folders(tmp_path):
    for item in ("cat", "dog", "emu", "fox"):
        for j in range(3):
            write(tmp_path / item / f"{j}.png", encoded("PNG"))
    write(tmp_path / "fox" / "sub" / "x.jpg", encoded())
    write(tmp_path / "stray.jpg", encoded())
    scan = scan_folders(str(tmp_path), query_per_item=1, train_fraction=0.5)
    split = {r["image_id"]: (r["item_id"], r["split"], r["camera_id"]) for r in scan.rows}
    assert split["cat/0.png"] == ("cat", "train", None)
    assert split["emu/0.png"] == ("emu", "query", None)
    assert split["emu/1.png"] == ("emu", "gallery", None)
    assert split["fox/sub/x.jpg"] == ("fox", "gallery", None)
    assert scan.rejected == [("stray.jpg", "not inside an item folder (ROOT/<item_id>/<image>)")]


def test_scan_folders_rejects_symlinks_out(tmp_path):
    outside = write(tmp_path / "outside" / "secret.jpg", encoded())
    root = tmp_path / "root"
    write(root / "a" / "0.jpg", encoded())
    os.symlink(outside, root / "a" / "1.jpg")
    os.symlink(outside.parent, root / "b")
    os.symlink(root / "a", root / "a" / "loop")  # inside the root, but could loop
    scan = scan_folders(str(root), train_fraction=1.0)
    assert [r["image_id"] for r in scan.rows] == ["a/0.jpg"]
    assert sorted(scan.rejected) == [("a/1.jpg", "symlink points outside the dataset root"),
                                     ("a/loop", "symlinked folder (not followed)"),
                                     ("b", "symlink points outside the dataset root")]


# ---------------------------------------------------------------- manifest

def test_scan_manifest_csv(tmp_path):
    root = tmp_path / "root"
    write(root / "img" / "a.jpg", encoded())
    write(root / "img" / "b.png", encoded("PNG"))
    write(root / "img" / "c.jpg", encoded())
    csv = tmp_path / "m.csv"
    csv.write_text("path,item_id,camera_id,split\n"
                   "img/a.jpg,0001,1,query\n"
                   "./img/b.png,0001,,gallery\n"
                   "img/sub/../c.jpg,2,3,train\n"
                   "img/missing.jpg,3,1,train\n")
    scan = scan_manifest(str(root), str(csv))
    assert scan.rows == [
        {"image_id": "img/a.jpg", "item_id": "0001", "camera_id": 1, "path": "img/a.jpg",
         "split": "query"},
        {"image_id": "img/b.png", "item_id": "0001", "camera_id": None, "path": "img/b.png",
         "split": "gallery"},
        {"image_id": "img/c.jpg", "item_id": "2", "camera_id": 3, "path": "img/c.jpg",
         "split": "train"},
    ]
    assert scan.rejected == [("img/missing.jpg", "file not found")]


def test_scan_manifest_parquet_without_split(tmp_path):
    root = tmp_path / "root"
    paths = [f"p/{i}.jpg" for i in range(6)]
    for p in paths:
        write(root / p, encoded())
    pq.write_table(pa.table({"path": paths, "item_id": pa.array([1, 1, 1, 2, 2, 2])}),
                   tmp_path / "m.parquet")
    scan = scan_manifest(str(root), str(tmp_path / "m.parquet"), query_per_item=1,
                         train_fraction=0.5)
    assert [(r["item_id"], r["split"]) for r in scan.rows] == [
        ("1", "train")] * 3 + [("2", "query"), ("2", "gallery"), ("2", "gallery")]
    assert all(r["camera_id"] is None for r in scan.rows)


@pytest.mark.parametrize("path, message", [
    ("/etc/passwd", "absolute"),
    ("../outside/x.jpg", "leaves the dataset root"),
    ("img/../../outside/x.jpg", "leaves the dataset root"),
    ("link/x.jpg", "resolves outside"),
    (".", "names the root"),
])
def test_manifest_path_escape_is_refused(tmp_path, path, message):
    """The escaping row is rejected with its reason (as --format folders rejects a file); the
    other rows are kept."""
    root = tmp_path / "root"
    write(root / "img" / "a.jpg", encoded())
    write(tmp_path / "outside" / "x.jpg", encoded())
    os.symlink(tmp_path / "outside", root / "link")
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,item_id\nimg/a.jpg,1\n{path},2\n")
    scan = scan_manifest(str(root), str(csv))
    assert [r["path"] for r in scan.rows] == ["img/a.jpg"]
    assert [p for p, _ in scan.rejected] == [path] and message in scan.rejected[0][1]
    with pytest.raises(PathEscapeError, match=message):
        safe_relpath(str(root), path)


@pytest.mark.parametrize("text, message", [
    ("path,label\na.jpg,1\n", "lacks column.*item_id"),
    ("path,item_id\na.jpg,1\n./a.jpg,2\n", "appears twice"),
])
def test_bad_manifest_files(tmp_path, text, message):
    write(tmp_path / "a.jpg", encoded())
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(IngestError, match=message):
        scan_manifest(str(tmp_path), str(tmp_path / "m.csv"))


def test_bad_manifest_rows_are_rejected_one_by_one(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write(tmp_path / name, encoded())
    (tmp_path / "m.csv").write_text("path,item_id,camera_id,split\na.jpg,1,3,query\nb.jpg,1,cam1,query\n"
                                    "c.jpg,1,2,test\nd.jpg,,2,gallery\n")
    scan = scan_manifest(str(tmp_path), str(tmp_path / "m.csv"))
    assert [(r["path"], r["camera_id"]) for r in scan.rows] == [("a.jpg", 3)]
    reasons = dict(scan.rejected)
    assert "camera_id 'cam1' is not an int32" in reasons["b.jpg"]
    assert "split 'test'" in reasons["c.jpg"] and "no item_id" in reasons["d.jpg"]


def test_scan_dataset_dispatch(tmp_path):
    write(tmp_path / "x" / "a.jpg", encoded())
    with pytest.raises(IngestError, match="--manifest"):
        scan_dataset("manifest", str(tmp_path))
    (tmp_path / "manifest.csv").write_text("path,item_id\nx/a.jpg,7\n")
    assert scan_dataset("manifest", str(tmp_path)).rows[0]["item_id"] == "7"
    with pytest.raises(ValueError, match="unknown format"):
        scan_dataset("coco", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        scan_manifest(str(tmp_path), str(tmp_path / "none.csv"))
