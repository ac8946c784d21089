"""evaluate.py --results --report --images draws query.py's retrieved lists as pictures."""
import os
import shutil
import subprocess
import sys

from tests.serving.serving_data import embed_files, make_gallery

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def job(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "pipelines", name), *map(str, args)],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_results_report_has_ranked_pictures(tmp_path):
    from PIL import Image

    g = make_gallery(str(tmp_path))
    os.makedirs(os.path.join(g.root, "q"))
    qids = ["q/a.jpg", "q/b.jpg"]
    for q, src in zip(qids, ["item0/0.jpg", "item2/1.jpg"]):
        shutil.copy(os.path.join(g.root, src), os.path.join(g.root, q))
    qemb = str(tmp_path / "qemb" / "part-0.parquet")
    embed_files(g.model_dir, g.root, qids, ["1", "3"], qemb, camera=2)
    r = job("query.py", "--index", g.index, "--queries", qemb, "--k", 5, "--out", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    report = tmp_path / "report"
    r = job("evaluate.py", "--results", tmp_path / "res", "--query", qemb, "--gallery-labels", g.embeddings,
            "--report", report, "--images", g.root)
    assert r.returncode == 0, r.stderr
    page = (report / "index.html").read_text()
    assert "ranked_instance_none.png" in page
    img = Image.open(report / "ranked_instance_none.png")
    assert img.width > 400 and img.height > 150  # a row per query, query + 5 results
    r = job("evaluate.py", "--results", tmp_path / "res", "--query", qemb, "--gallery-labels", g.embeddings,
            "--out", tmp_path / "r.json", "--images", g.root)
    assert r.returncode == 2 and "--images is for the --report pictures" in r.stderr
