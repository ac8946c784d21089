import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from model.shards import (
    ShardReadWarning,
    image_id_for,
    iter_shard_samples,
    key_for,
    list_shards,
    row_json,
    shard_name,
    write_shards,
)


def encoded(fmt="JPEG", colour=(200, 30, 30), size=(16, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def rows(n, split="query", prefix="query/"):
    return [{"image_id": f"{prefix}{i:04d}_c{i % 6 + 1}s1_{i:06d}_01.jpg", "item_id": str(i // 2),
             "camera_id": i % 6 + 1, "split": split, "path": f"{prefix}{i:04d}.jpg"}
            for i in range(n)]


def samples(rs):
    jpg, png = encoded(), encoded("PNG", (0, 90, 200))
    return [(r, jpg if i % 3 else png, "jpg" if i % 3 else "png") for i, r in enumerate(rs)]


TRICKY = ["a.b", "a%2Eb", "a/b", "a_b", "a%2Fb", "a b", "ä/ö.jpg", "..", "x.jpg.jpg", "-1_c1.jpg",
          "__key__", "a~b"]


def test_keys_are_safe_and_injective():
    keys = [key_for(x) for x in TRICKY]
    assert len(set(keys)) == len(TRICKY)
    for x, k in zip(TRICKY, keys):
        assert "." not in k and "/" not in k and k.isascii()
        assert image_id_for(k) == x
    with pytest.raises(ValueError):
        key_for("")
    assert shard_name("train", 12) == "train-000012.tar"


def test_round_trip_with_webdataset_and_own_reader(tmp_path):
    import webdataset as wds

    rs = rows(7) + [{"image_id": x, "item_id": "1", "camera_id": None, "split": "query",
                     "path": x} for x in TRICKY]
    ss = samples(rs)
    paths = write_shards(ss, str(tmp_path), "query", shard_size=5)
    assert [os.path.basename(p) for p in paths] == [f"query-{i:06d}.tar" for i in range(4)]

    ds = wds.WebDataset(paths, shardshuffle=False, nodesplitter=wds.split_by_node,
                        handler=wds.reraise_exception)
    got = list(ds)
    assert len(got) == len(ss)
    for sample, (row, data, ext) in zip(got, ss):
        assert sample["__key__"] == key_for(row["image_id"])
        assert sample[ext] == data
        assert json.loads(sample["json"]) == row

    mine = list(iter_shard_samples(paths))
    assert [(k, d, e, r) for k, d, e, r in mine] == [
        (key_for(r["image_id"]), d, e, r) for r, d, e in ss]


def test_bytes_equal_webdataset_tarwriter_and_are_deterministic(tmp_path):
    import webdataset as wds

    ss = samples(rows(4)) + [({"image_id": "q/" + "long" * 60 + ".jpg", "item_id": "3",
                               "camera_id": 2, "split": "query", "path": "p"}, encoded(), "jpg")]
    (a,) = write_shards(ss, str(tmp_path / "a"), "query", shard_size=100)
    (b,) = write_shards(ss, str(tmp_path / "b"), "query", shard_size=100)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    buf = io.BytesIO()
    w = wds.TarWriter(buf, user="", group="", mode=0o444, mtime=0, encoder=False,
                      compress=False, format="PAX_FORMAT")
    for r, d, e in ss:
        w.write({"__key__": key_for(r["image_id"]), e: d, "json": row_json(r)})
    w.close()
    assert Path(a).read_bytes() == buf.getvalue()
    with tarfile.open(a) as t:
        for m in t.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        write_shards([(rows(1)[0], b"x", "gif")], str(tmp_path), "query")
    with pytest.raises(ValueError, match="split"):
        write_shards([(rows(1)[0], b"x", "jpg")], str(tmp_path), "train")
    with pytest.raises(ValueError, match="shard size"):
        write_shards([], str(tmp_path), "query", shard_size=0)
    assert write_shards([], str(tmp_path / "e"), "query") == []


def test_truncated_shard_yields_complete_samples_and_reports(tmp_path):
    ss = samples(rows(6))
    (path,) = write_shards(ss, str(tmp_path), "query", shard_size=10)
    data = Path(path).read_bytes()
    with tarfile.open(path) as t:
        cut = t.getmember(key_for(ss[3][0]["image_id"]) + "." + ss[3][2]).offset_data + 10
    bad = tmp_path / "cut-000000.tar"
    bad.write_bytes(data[:cut])
    errors = []
    got = list(iter_shard_samples([str(bad), path], on_error=lambda u, e: errors.append(u)))
    assert [k for k, *_ in got[:3]] == [key_for(r["image_id"]) for r, _, _ in ss[:3]]
    assert len(got) == 3 + 6  # the second, whole shard is read after the damaged one
    assert errors == [str(bad)]
    # Cut inside a header block: tarfile alone would stop silently; we report it.
    with tarfile.open(path) as t:
        header_cut = t.getmember(key_for(ss[2][0]["image_id"]) + ".json").offset + 100
    bad.write_bytes(data[:header_cut])
    with pytest.warns(ShardReadWarning, match="truncated"):
        assert len(list(iter_shard_samples(str(bad)))) == 2
    for junk in (b"", b"not a tar at all" * 10):
        bad.write_bytes(junk)
        with pytest.warns(ShardReadWarning):
            assert list(iter_shard_samples(str(bad))) == []
    with pytest.warns(ShardReadWarning, match="No such file"):
        assert list(iter_shard_samples(str(tmp_path / "missing.tar"))) == []


def test_member_names_are_never_paths(tmp_path, monkeypatch):
    evil = tmp_path / "evil-000000.tar"
    row_a = {"image_id": "a", "item_id": "1", "camera_id": None, "split": "gallery"}
    row_x = {**row_a, "image_id": "x"}
    with tarfile.open(evil, "w") as t:
        for name, data in (("../../escape.jpg", encoded()), ("../../escape.json", json.dumps(row_a).encode()),
                           ("/abs/x.jpg", encoded()), ("/abs/x.json", json.dumps(row_x).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    got = list(iter_shard_samples(str(evil)))
    assert [(k, e, r) for k, _, e, r in got] == [("../../escape", "jpg", row_a),
                                                ("/abs/x", "jpg", row_x)]
    assert sorted(os.listdir(tmp_path)) == ["a", "evil-000000.tar"]
    assert os.listdir(work) == []


def test_list_shards(tmp_path):
    out = tmp_path / "out"
    write_shards(samples(rows(3)), str(out / "shards"), "query", 2)
    write_shards(samples(rows(2, "train", "t/")), str(out / "shards"), "train", 1)
    (out / "shards" / "notes.txt").write_text("x")
    (out / "shards" / "query-1.tar").write_text("x")
    names = [os.path.basename(p) for p in list_shards(out)]
    assert names == ["query-000000.tar", "query-000001.tar", "train-000000.tar",
                     "train-000001.tar"]
    assert list_shards(out / "shards", split="train") == [
        str(out / "shards" / f"train-00000{i}.tar") for i in range(2)]
    assert len(list_shards(str(out / "shards" / "query-*.tar"))) == 2
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path / "nope")
