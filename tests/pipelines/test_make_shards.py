import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from contracts.manifest import items_of, read_manifest, split_counts
from model.shards import iter_shard_samples, list_shards
from pipelines import make_shards, make_synthetic
from pipelines._cli import run_main

REPO = Path(__file__).resolve().parents[2]


def jpeg(seed=0, size=(16, 32)):
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def cli(module, argv, capsys):
    """Run a job's main the way its __main__ does; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_main(module.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_market_mini(market_mini, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = cli(make_shards, ["--format", "market1501", "--root", str(market_mini),
                                        "--out", str(out), "--workers", "2"], capsys)
    assert code == 0
    m = read_manifest(out / "manifest.parquet")
    assert split_counts(m) == {"train": 2412, "query": 686, "gallery": 4000}
    assert len(items_of(m, "query")) == 150 and len(items_of(m, "train")) == 151
    assert set(m.column("camera_id").to_pylist()) == {1, 2, 3, 4, 5, 6}
    assert pq.read_table(out / "rejected.parquet").num_rows == 0
    assert [Path(p).name for p in list_shards(out, "query")] == ["query-000000.tar"]
    assert len(list_shards(out, "gallery")) == 4 and len(list_shards(out, "train")) == 3
    n = sum(1 for _ in iter_shard_samples(list_shards(out)))
    assert n == 7098
    assert "query         686" in stdout and "rejected 0" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_folders_with_resize_and_determinism(tmp_path, capsys):
    root = tmp_path / "root"
    for i, item in enumerate(["b", "a", "c", "d"]):
        for j in range(3):
            (root / item).mkdir(parents=True, exist_ok=True)
            (root / item / f"{j}.jpg").write_bytes(jpeg(10 * i + j))
    (root / "d" / "bad.jpg").write_bytes(b"")
    args = ["--format", "folders", "--root", str(root), "--resize", "24x12",
            "--query-per-item", "2", "--train-fraction", "0.5", "--shard-size", "2",
            "--workers", "1"]
    assert cli(make_shards, args + ["--out", str(tmp_path / "o1")], capsys)[0] == 0
    assert cli(make_shards, args + ["--out", str(tmp_path / "o2")], capsys)[0] == 0
    one = tree_bytes(tmp_path / "o1")
    assert one == tree_bytes(tmp_path / "o2")
    m = read_manifest(tmp_path / "o1" / "manifest.parquet")
    split = {r["image_id"]: r["split"] for r in m.to_pylist()}
    assert {k for k, v in split.items() if v == "train"} == {f"{i}/{j}.jpg" for i in "ab"
                                                              for j in range(3)}
    assert [split[f"c/{j}.jpg"] for j in range(3)] == ["query", "query", "gallery"]
    assert pq.read_table(tmp_path / "o1" / "rejected.parquet").to_pylist() == [
        {"path": "d/bad.jpg", "reason": "empty file (0 bytes)"}]
    for _, data, ext, _ in iter_shard_samples(list_shards(tmp_path / "o1")):
        assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (12, 24)


def test_rerun_replaces_previous_output_and_failure_keeps_it(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "query").mkdir(parents=True)
    (root / "query" / "0001_c1s1_000001_01.jpg").write_bytes(jpeg())
    out = tmp_path / "out"
    args = ["--format", "market1501", "--root", str(root), "--out", str(out)]
    assert cli(make_shards, args, capsys)[0] == 0
    before = tree_bytes(out)
    (root / "query" / "0001_c1s1_000001_01.jpg").write_bytes(b"broken")
    code, _, err = cli(make_shards, args, capsys)
    assert code == 2 and err == f"error: no readable images under {root}: all 1 rejected\n"
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "root"]


@pytest.mark.parametrize("argv, message", [
    (["--format", "coco", "--root", "R", "--out", "O"], "argument --format: invalid choice"),
    (["--format", "market1501", "--root", "R"], "the following arguments are required: --out"),
    (["--format", "market1501", "--root", "R", "--out", "O", "--bogus"], "unrecognized arguments"),
    (["--format", "market1501", "--root", "R", "--out", "O", "--resize", "big"], "--resize must"),
    (["--format", "market1501", "--root", "R", "--out", "O", "--shard-size", "0"], "--shard-size"),
    (["--format", "market1501", "--root", "MISSING", "--out", "O"], "dataset root not found"),
    (["--format", "market1501", "--root", "R", "--out", "R/O"], "must not contain or be inside"),
    (["--format", "market1501", "--root", "R", "--out", "NOTOUT"], "not a make_shards output"),
    (["--format", "manifest", "--root", "R", "--out", "O", "--manifest", "R/esc.csv"],
     "no images found"),  # its only row leaves the root: rejected, nothing left to write
    (["--format", "manifest", "--root", "R", "--out", "O"], "needs --manifest"),
    (["--format", "folders", "--root", "R", "--out", "O", "--train-fraction", "2"],
     "--train-fraction must be in"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    root = tmp_path / "R"
    (root / "query").mkdir(parents=True)
    (root / "query" / "0001_c1s1_000001_01.jpg").write_bytes(jpeg())
    (root / "esc.csv").write_text("path,item_id\n../x.jpg,2\n")
    (tmp_path / "NOTOUT").mkdir()
    (tmp_path / "NOTOUT" / "precious.txt").write_text("keep me")
    argv = [str(tmp_path / a) if a in ("R", "O", "R/O", "MISSING", "NOTOUT", "R/esc.csv") else a
            for a in argv]
    code, _, err = cli(make_shards, argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "O").exists()
    assert (tmp_path / "NOTOUT" / "precious.txt").read_text() == "keep me"


def test_synthetic_to_shards_and_script_entry_points(tmp_path, capsys):
    data = tmp_path / "syn"
    code, stdout, _ = cli(make_synthetic, ["--items", "6", "--images-per-item", "4",
                                           "--cameras", "3", "--size", "32x16", "--out",
                                           str(data), "--workers", "1"], capsys)
    assert code == 0 and "wrote 26 images" in stdout
    code, _, err = cli(make_synthetic, ["--items", "0", "--images-per-item", "4",
                                        "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err == "error: --items must be >= 1, got 0\n"
    code, _, err = cli(make_synthetic, ["--items", "2", "--images-per-item", "2",
                                        "--out", str(tmp_path)], capsys)
    assert code == 2 and "not a dataset written by make_synthetic" in err
    # The scripts run as files (sys.path set up by their first line) and --help works.
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / "make_shards.py"), "--format",
                        "market1501", "--root", str(data), "--out", str(tmp_path / "shards")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "train          12 images       3 items" in r.stdout
    m = read_manifest(tmp_path / "shards" / "manifest.parquet")
    assert split_counts(m) == {"train": 12, "query": 3, "gallery": 11}
    assert items_of(m, "gallery") == {"4", "5", "6", "-1", "0"}
    for script in ("make_shards.py", "make_synthetic.py"):
        r = subprocess.run([sys.executable, str(REPO / "pipelines" / script), "--help"],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and "--out" in r.stdout
