"""evaluate.py --rerank and --report DIR (pictures, HTML), and the report's image sources."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from contracts.vectors import l2_normalize, make_embeddings_table, write_table_atomic
from pipelines import evaluate
from pipelines._cli import run_main
from pipelines._images import image_reader


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(evaluate.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Clustered identities, 3 cameras, junk; images on disk named by image_id (dataset root)."""
    tmp = tmp_path_factory.mktemp("evrep")
    rng = np.random.default_rng(5)
    n_items, per, dim = 40, 6, 24
    centres = rng.normal(size=(n_items, dim))
    gi = np.repeat(np.arange(n_items), per)
    g = l2_normalize(centres[gi] + 0.9 * rng.normal(size=(len(gi), dim)))
    g_items = gi.astype(str).astype(object)
    g_items[::13] = "-1"
    q = l2_normalize(centres + 0.9 * rng.normal(size=(n_items, dim)))
    rows = [("query", q, np.arange(n_items).astype(str), rng.integers(1, 4, n_items)),
            ("gallery", g, g_items, rng.integers(1, 4, len(g)))]
    ids, items, cams, splits, vecs = [], [], [], [], []
    for split, x, it, cm in rows:
        ids += [f"{split}/{i:04d}.png" for i in range(len(x))]
        items += list(it)
        cams += list(cm)
        splits += [split] * len(x)
        vecs.append(x)
    write_table_atomic(make_embeddings_table(ids, items, cams, splits, np.concatenate(vecs), "m1"),
                       str(tmp / "emb.parquet"))
    root = tmp / "root"
    for k, image_id in enumerate(ids):
        path = root / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 128), (0, 0, 40 + k % 200)).save(path)
    pq.write_table(pa.table({"image_id": ids, "path": ids}), tmp / "manifest.parquet")
    return tmp, ids


def base(tmp):
    return ["--query", tmp / "emb.parquet", "--query-split", "query", "--gallery", tmp / "emb.parquet",
            "--gallery-split", "gallery", "--k1", "8", "--k2", "3"]


def test_report_dir_with_rerank_and_pictures(data, capsys):
    tmp, _ = data
    out = tmp / "report"
    code, stdout, err = run_cli(base(tmp) + ["--mode", "both", "--rerank", "none", "--rerank", "kreciprocal",
                                             "--report", out, "--samples", "3", "--images", tmp / "root"], capsys)
    assert code == 0, err
    reports = json.loads((out / "report.json").read_text())
    assert [(r["mode"], r["rerank"]) for r in reports] == [
        ("instance", None), ("instance", "kreciprocal"), ("centroid", None), ("centroid", "kreciprocal")]
    assert reports[1]["rerank_form"] == "dense" and reports[1]["rerank_params"]["k1"] == 8
    assert reports[1]["mAP"] > reports[0]["mAP"]  # clustered data: re-ranking helps
    assert "rerank_form" not in reports[0]
    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["cmc.png", "ranked_centroid_kreciprocal.png", "ranked_centroid_none.png",
                    "ranked_instance_kreciprocal.png", "ranked_instance_none.png"]
    for name in pngs:
        assert f"src='{name}'" in page
    # the pictures hold the images (dark blue pixels of the generated files)
    a = np.asarray(Image.open(out / "ranked_instance_none.png").convert("RGB")).astype(int)
    assert ((a[..., 0] == 0) & (a[..., 1] == 0) & (a[..., 2] >= 40)).sum() > 3 * 11 * 64 * 128
    assert "kreciprocal" in stdout


def test_single_rerank_writes_one_report_object(data, capsys):
    tmp, _ = data
    code, _, err = run_cli(base(tmp) + ["--rerank", "dba,alpha-qe", "--qe-n", "2", "--out", tmp / "one.json"],
                           capsys)
    assert code == 0, err
    r = json.loads((tmp / "one.json").read_text())
    assert r["rerank"] == "dba,alpha-qe" and r["rerank_params"] == {"qe_n": 2, "alpha": 3.0, "dba_n": 5,
                                                                   "dba_alpha": 0.0}
    assert "rerank_form" not in r
    # sparse form on request, recorded
    code, _, err = run_cli(base(tmp) + ["--rerank", "kreciprocal", "--rerank-form", "sparse",
                                        "--out", tmp / "sparse.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp / "sparse.json").read_text())["rerank_form"] == "sparse"


def test_report_without_images_shows_ids(data, capsys):
    tmp, _ = data
    code, _, err = run_cli(base(tmp) + ["--report", tmp / "noimg", "--samples", "2"], capsys)
    assert code == 0, err
    assert (tmp / "noimg" / "ranked_instance_none.png").exists()
    assert "No --images" in (tmp / "noimg" / "index.html").read_text()
    assert isinstance(json.loads((tmp / "noimg" / "report.json").read_text()), dict)


def test_bad_rerank_is_one_line_error(data, capsys):
    tmp, _ = data
    (tmp / "keep.json").write_text("previous")
    for bad in (["--rerank", "kreciprocal,nope"], ["--rerank", "aqe,alpha-qe"], ["--k1", "0", "--rerank", "kreciprocal"]):
        code, _, err = run_cli(base(tmp) + bad + ["--out", tmp / "keep.json", "--report", tmp / "badrep"], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert (tmp / "keep.json").read_text() == "previous" and not (tmp / "badrep").exists()
    code, _, err = run_cli(base(tmp), capsys)  # neither --out nor --report
    assert code == 2 and "--out" in err


def test_image_reader_sources(data, tmp_path):
    from model.shards import write_shards

    tmp, ids = data
    want = ids[:3]
    # dataset root, manifest (+ root), shards
    readers = [image_reader(str(tmp / "root")),
               image_reader(str(tmp / "manifest.parquet"), image_root=str(tmp / "root"))]
    samples = []
    for image_id in ids[:5]:
        buf = io.BytesIO()
        Image.open(tmp / "root" / image_id).save(buf, format="PNG")
        samples.append(({"image_id": image_id, "item_id": "1", "camera_id": 1, "split": "query",
                         "path": image_id}, buf.getvalue(), "png"))
    write_shards(samples, str(tmp_path / "shards"), "query", shard_size=2)
    readers.append(image_reader(str(tmp_path / "shards"), wanted=want))
    for read in readers:
        for image_id in want:
            img = read(image_id)
            assert img is not None and img.size == (64, 128)
            assert np.array_equal(np.asarray(img.convert("RGB")),
                                  np.asarray(Image.open(tmp / "root" / image_id).convert("RGB")))
        assert read("missing/x.png") is None
    with pytest.raises(FileNotFoundError):
        image_reader(str(tmp_path / "nowhere"))
