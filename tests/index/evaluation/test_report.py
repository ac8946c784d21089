"""index.evaluation.report: CMC plot, ranked-list pictures, HTML page, atomic report directory."""
import json

import numpy as np
import pytest
from PIL import Image

from index.evaluation.report import (
    STATUS_COLOURS,
    RankedRow,
    Tile,
    plot_cmc,
    plot_ranked_lists,
    render_html,
    report_slug,
    write_report,
)


def report(mode="instance", rerank=None, m=0.5, **extra):
    return {"mode": mode, "rerank": rerank, "num_queries": 10, "num_valid_queries": 9, "mAP": m, "mINP": 0.3,
            "cmc": {"1": 0.6, "5": 0.8, "10": 0.9, "20": 1.0, "50": 1.0}, **extra}


def rows(n=2):
    statuses = ["match", "wrong", "ignored", "wrong", "match"]
    return [RankedRow(Tile(f"q{i}.jpg", "p1 c1", "query"),
                      [Tile(f"g{i}_{j}.jpg", f"p{j}\n0.9", statuses[j % 5]) for j in range(10)])
            for i in range(n)]


def solid(colour):
    return Image.new("RGB", (64, 128), colour)


def colour_present(path, hex_colour, tol=30):
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(a - rgb).sum(axis=2) < tol).sum()


def test_cmc_png(tmp_path):
    path = tmp_path / "cmc.png"
    plot_cmc({"instance": np.linspace(0.5, 1, 50), "centroid + kreciprocal": np.linspace(0.6, 1, 50)}, str(path))
    img = Image.open(path)
    assert img.format == "PNG" and img.size[0] > 300


def test_ranked_lists_borders_and_images(tmp_path):
    path = tmp_path / "ranked.png"
    # images: pure blue pixels, so border colours can be counted apart from them
    plot_ranked_lists(rows(), str(path), "instance", read_image=lambda image_id: solid((0, 0, 255)))
    assert colour_present(path, STATUS_COLOURS["match"]) > 500
    assert colour_present(path, STATUS_COLOURS["wrong"]) > 500
    assert colour_present(path, STATUS_COLOURS["ignored"]) > 500
    assert colour_present(path, "#0000ff", tol=5) > 64 * 128  # the images were drawn
    # no images / unreadable images: id tiles, no crash, no blue
    def broken(image_id):
        raise OSError("cannot identify image file")
    for reader in (None, broken, lambda image_id: None):
        plot_ranked_lists(rows(1), str(tmp_path / "ids.png"), "x", read_image=reader)
        assert colour_present(tmp_path / "ids.png", "#0000ff", tol=5) == 0


def test_render_html_escapes_and_lists_reports():
    page = render_html([report(), report("centroid", "kreciprocal", rerank_params={"k1": 20}, rerank_form="dense")],
                       "cmc.png", [("<x>", "ranked_a.png")], title="t&t")
    assert "t&amp;t" in page and "&lt;x&gt;" in page and "<x>" not in page
    assert "src='cmc.png'" in page and "src='ranked_a.png'" in page
    assert "50.00" in page and "k1=20" in page and "dense" in page


def test_write_report_directory(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    reports = [report(), report(rerank="dba,alpha-qe", m=0.7)]
    ranked = {report_slug(r): rows() for r in reports}
    names = write_report(str(out), reports, {"instance": np.ones(50)}, ranked)
    assert report_slug(reports[1]) == "instance_dba-alpha-qe"
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # replaced whole: stale file gone
    assert json.loads((out / "report.json").read_text()) == reports
    page = (out / "index.html").read_text()
    for name in names:
        if name.endswith(".png"):
            assert f"src='{name}'" in page
            assert Image.open(out / name).format == "PNG"
    # one report: report.json holds the object itself
    write_report(str(out), [reports[0]])
    assert json.loads((out / "report.json").read_text()) == reports[0]
    with pytest.raises(ValueError):
        write_report(str(tmp_path / "none"), [])
    assert not (tmp_path / "none").exists()
