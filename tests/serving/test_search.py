"""serving.inputs, serving.engine and pipelines/search.py on a tiny real gallery (no Ray)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.serving.serving_data import jpeg, make_gallery, save_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return make_gallery(str(tmp_path_factory.mktemp("serving")))


def test_collect_images_files_folders_and_lists(tmp_path):
    from serving.inputs import collect_images

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.jpg").write_bytes(jpeg(1))
    (tmp_path / "a" / "b" / "y.png").write_bytes(jpeg(2))
    (tmp_path / "a" / "notes.txt").write_text("not an image list entry\n")  # skipped in a folder walk
    (tmp_path / "list.csv").write_text("path\na/x.jpg\n")
    got = collect_images([str(tmp_path / "a"), str(tmp_path / "list.csv")])
    assert [q.query_id for q in got] == ["x.jpg", "b/y.png", "a/x.jpg"]
    assert got[2].path == str(tmp_path / "a/x.jpg")
    with pytest.raises(FileNotFoundError, match="no such file"):
        collect_images([str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="not an image"):
        (tmp_path / "data.bin").write_bytes(b"x")
        collect_images([str(tmp_path / "data.bin")])


def test_engine_ranks_a_gallery_image_first_with_the_index_model(gallery):
    from serving.engine import SearchEngine

    eng = SearchEngine(gallery.index)
    try:
        data = Path(gallery.root, "item2/1.jpg").read_bytes()
        ranked, ok, reasons = eng.search_images([data, b"not an image"], k=5)
        assert ok.tolist() == [True, False] and "undecodable" in reasons[1]
        assert ranked.image_ids[0, 0] == "item2/1.jpg" and ranked.item_ids[0, 0] == "3"
        assert ranked.scores[0, 0] == pytest.approx(1.0, abs=1e-4)
        assert np.all(np.diff(ranked.scores[0]) <= 1e-6)
    finally:
        eng.close()


def test_engine_refuses_another_model(gallery, tmp_path):
    import torch

    from serving.engine import ModelMismatchError, SearchEngine

    other = str(tmp_path / "other")
    torch.manual_seed(1)
    save_tiny_model(other)
    # same seed inside save_tiny_model -> same weights; perturb the file to get another id
    from model.checkpoint import load_model, save_model

    net, cfg, _ = load_model(other)
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    save_model(net, cfg, other)
    with pytest.raises(ModelMismatchError, match="was built from model"):
        SearchEngine(gallery.index, model_dir=other)


def run_job(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "pipelines", "search.py"), *map(str, args)],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_search_job_writes_results_errors_and_report(gallery, tmp_path):
    from contracts.results import read_results

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "sub" / "q.jpg").write_bytes(Path(gallery.root, "item0/2.jpg").read_bytes())
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out, report = tmp_path / "res", tmp_path / "report"
    r = run_job("--index", gallery.index, "--images", photos, "--k", 4, "--out", out,
                "--report", report, "--gallery-images", gallery.root, "--quiet")
    assert r.returncode == 0, r.stderr
    t = read_results(str(out))
    assert set(t.column("query_id").to_pylist()) == {"sub/q.jpg"}
    assert t.column("image_id")[0].as_py() == "item0/2.jpg" and t.column("rank").to_pylist() == [0, 1, 2, 3]
    errs = pq.read_table(out / "_errors.parquet").to_pylist()
    assert errs[0]["query_id"] == "broken.jpg" and "undecodable" in errs[0]["reason"]
    page = (report / "index.html").read_text()
    assert "ranked_000.png" in page and (report / "ranked_000.png").stat().st_size > 1000
    assert r.stdout.strip().splitlines()[-1].startswith("report:")  # --quiet: the job's lines only
    assert "INFO" not in r.stderr + r.stdout


def test_search_rerank_equals_embed_then_query(gallery, tmp_path):
    """search.py --rerank aqe gives the same lists as embedding the photo and running query.py."""
    from contracts.results import read_results
    from tests.serving.serving_data import embed_files

    photos = tmp_path / "p"
    photos.mkdir()
    (photos / "q.jpg").write_bytes(jpeg(7))
    embed_files(gallery.model_dir, str(photos), ["q.jpg"], ["0"], str(tmp_path / "qemb" / "part-0.parquet"))
    r = run_job("--index", gallery.index, "--images", photos, "--k", 6, "--out", tmp_path / "a", "--rerank", "aqe")
    assert r.returncode == 0, r.stderr
    q = subprocess.run([sys.executable, os.path.join(REPO, "pipelines", "query.py"), "--index", gallery.index,
                        "--queries", tmp_path / "qemb", "--k", "6", "--rerank", "aqe", "--out", tmp_path / "b"],
                       check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert q.returncode == 0, q.stderr
    a, b = read_results(str(tmp_path / "a")), read_results(str(tmp_path / "b"))
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-5)


def test_search_job_one_line_errors(gallery, tmp_path):
    img = tmp_path / "q.jpg"
    img.write_bytes(jpeg(5))
    r = run_job("--index", gallery.index, "--images", img, "--out", tmp_path / "o", "--model", tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a model directory" in r.stderr
    r = run_job("--index", tmp_path / "nope", "--images", img, "--out", tmp_path / "o")
    assert r.returncode == 2 and "no such index" in r.stderr
    assert not (tmp_path / "o").exists()
