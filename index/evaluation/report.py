"""Evaluation reports people can look at: CMC curves, ranked-list pictures, an HTML page.

`write_report(out_dir, reports, curves, ranked, read_image)` writes, atomically (a temporary
directory swapped into place):
- report.json: the report object (one) or list (several), as DESIGN.md's evaluation report;
- cmc.png: CMC@1..50 of every evaluated (mode, re-ranking) pair in one plot;
- ranked_<mode>_<rerank>.png: per sample query, the query image, then its top-10 gallery
  images with a green border for a true match, red for a wrong one, grey for an entry the
  protocol ignores (same item and camera as the query, or junk);
- index.html: the numbers (a table of all reports, parameters included) and the pictures.

Images come from `read_image(image_id) -> PIL.Image or None` (the caller decides where bytes
live: shards, manifest + dataset root); without it, or when an image cannot be read, the tile
shows the image id instead. This module knows nothing about models or files of images.
"""
from __future__ import annotations

import html
import json
import os
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

STATUS_COLOURS = {"match": "#1a9641", "wrong": "#d7191c", "ignored": "#8c8c8c", "query": "#2b83ba"}
ReadImage = Callable[[str], object]


@dataclass
class Tile:
    """One picture in a ranked list. status: "query", "match", "wrong" or "ignored"."""

    image_id: str | None
    caption: str
    status: str


@dataclass
class RankedRow:
    """One sample query and its top results, in rank order."""

    query: Tile
    results: list[Tile]


def report_label(report: dict) -> str:
    """"instance", "centroid + kreciprocal", ... for legends and titles."""
    return report["mode"] + (f" + {report['rerank']}" if report.get("rerank") else "")


def report_slug(report: dict) -> str:
    """A file-name-safe name for one report: "instance_none", "centroid_dba-alpha-qe"."""
    name = f"{report['mode']}_{report.get('rerank') or 'none'}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name.replace(",", "-"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_cmc(curves: dict[str, np.ndarray], path: str, title: str = "CMC") -> None:
    """CMC curves: label -> (R,) fractions at ranks 1..R. Instance curves solid, centroid
    dashed; re-ranked variants share their mode's line style with their own colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, curve in curves.items():
        curve = np.asarray(curve, float)
        ranks = np.arange(1, len(curve) + 1)
        style = "--" if label.startswith("centroid") else "-"
        ax.plot(ranks, 100 * curve, style, marker="o", markersize=2.5, linewidth=1.6,
                label=f"{label} (R1 {100 * curve[0]:.1f}%)" if len(curve) else label)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 50])
    ax.set_xticklabels(["1", "2", "5", "10", "20", "50"])
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _read(read_image: ReadImage | None, image_id: str | None):
    if read_image is None or image_id is None:
        return None
    try:
        img = read_image(image_id)
    except (OSError, ValueError, SyntaxError):  # unreadable picture: a text tile, never a failed report
        return None
    return None if img is None else np.asarray(img.convert("RGB"))


TILE_W, TILE_H, BORDER = 80, 160, 5  # pixels of one picture in a ranked list (Market-1501 is 64x128)


def _hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], np.uint8)


def _tile_pixels(img: np.ndarray | None) -> np.ndarray | None:
    if img is None:
        return None
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((TILE_W, TILE_H), Image.BILINEAR))


def plot_ranked_lists(rows: list[RankedRow], path: str, title: str,
                      read_image: ReadImage | None = None) -> None:
    """One picture: a row per sample query (query tile, then its results) with coloured borders.

    Drawn as one canvas (numpy) shown by a single matplotlib image plus text for captions, so a
    grid of 8 x 11 pictures takes well under a second."""
    plt = _pyplot()
    n_cols = 1 + max((len(r.results) for r in rows), default=0)
    n_rows = max(1, len(rows))
    gap_x, head, cap = 14, 18, 34  # pixels: between columns, above a tile, below a tile
    top = 30
    cell_w, cell_h = TILE_W + 2 * BORDER + gap_x, head + TILE_H + 2 * BORDER + cap
    width, height = n_cols * cell_w + gap_x, top + n_rows * cell_h
    canvas = np.full((height, width, 3), 255, np.uint8)
    texts = []  # (x, y, text, colour, size, va)
    for r, row in enumerate(rows):
        for c, tile in enumerate([row.query, *row.results]):
            x0 = gap_x + c * cell_w
            y0 = top + r * cell_h + head
            colour = STATUS_COLOURS.get(tile.status, "#000000")
            canvas[y0:y0 + TILE_H + 2 * BORDER, x0:x0 + TILE_W + 2 * BORDER] = _hex_rgb(colour)
            pix = _tile_pixels(_read(read_image, tile.image_id))
            inner = canvas[y0 + BORDER:y0 + BORDER + TILE_H, x0 + BORDER:x0 + BORDER + TILE_W]
            if pix is not None:
                inner[:] = pix
            else:
                inner[:] = 242
                text = "\n".join(textwrap.wrap(str(tile.image_id or "-"), 11)[:8])
                texts.append((x0 + BORDER + TILE_W / 2, y0 + BORDER + TILE_H / 2, text, "#000000", 6, "center"))
            label = "query" if c == 0 else f"#{c}"
            texts.append((x0 + BORDER + TILE_W / 2, y0 - 3, label,
                          STATUS_COLOURS["query"] if c == 0 else "#000000", 7.5, "bottom"))
            texts.append((x0 + BORDER + TILE_W / 2, y0 + TILE_H + 2 * BORDER + 3, tile.caption,
                          "#000000" if tile.status == "wrong" else colour, 6.5, "top"))
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for x, y, text, colour, size, va in texts:
        ax.text(x, y, text, ha="center", va=va, fontsize=size, color=colour, linespacing=1.1)
    ax.text(width / 2, 8, f"{title}   (border: green = match, red = wrong, grey = ignored same-camera / junk)",
            ha="center", va="top", fontsize=9)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _fmt(x) -> str:
    return f"{100 * x:.2f}" if isinstance(x, float) else html.escape(str(x))


def render_html(reports: list[dict], cmc_file: str | None, ranked_files: list[tuple[str, str]],
                title: str = "Retrieval evaluation", notes: list[str] | None = None) -> str:
    """The index page: a table of every report (percentages), the CMC plot and ranked lists."""
    ranks = list(reports[0]["cmc"]) if reports else []
    head = ("<tr><th>mode</th><th>re-ranking</th><th>form</th><th>valid / queries</th><th>mAP</th>"
            "<th>mINP</th>" + "".join(f"<th>R{html.escape(k)}</th>" for k in ranks) + "<th>parameters</th></tr>")
    body = []
    for r in reports:
        params = ", ".join(f"{k}={v}" for k, v in (r.get("rerank_params") or {}).items())
        body.append(
            "<tr>" + f"<td>{_fmt(r['mode'])}</td><td>{_fmt(r.get('rerank') or 'none')}</td>"
            f"<td>{_fmt(r.get('rerank_form') or '')}</td>"
            f"<td>{r['num_valid_queries']} / {r['num_queries']}</td><td>{_fmt(r['mAP'])}</td>"
            f"<td>{_fmt(r['mINP'])}</td>" + "".join(f"<td>{_fmt(r['cmc'][k])}</td>" for k in ranks)
            + f"<td class='p'>{html.escape(params)}</td></tr>")
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        ("<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}td.p{text-align:left;font-size:85%}"
        "img{max-width:100%;border:1px solid #ddd}</style></head><body>"),
        f"<h1>{html.escape(title)}</h1>",
        "<p>Metrics in percent (mAP, mINP, CMC@k). <a href='report.json'>report.json</a></p>",
        f"<table>{head}{''.join(body)}</table>",
    ]
    for note in notes or []:
        parts.append(f"<p>{html.escape(note)}</p>")
    if cmc_file:
        parts += ["<h2>CMC</h2>", f"<img src='{html.escape(cmc_file)}' alt='CMC curves'>"]
    if ranked_files:
        parts.append("<h2>Ranked lists of sample queries</h2>")
        parts.append("<p>Query first, then the top results: green border = true match, red = wrong, "
                     "grey = ignored by the protocol (same item and camera as the query, or junk).</p>")
        for label, name in ranked_files:
            parts += [f"<h3>{html.escape(label)}</h3>", f"<img src='{html.escape(name)}' alt='{html.escape(label)}'>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(out_dir: str, reports: list[dict], curves: dict[str, np.ndarray] | None = None,
                 ranked: dict[str, list[RankedRow]] | None = None, read_image: ReadImage | None = None,
                 title: str = "Retrieval evaluation", notes: list[str] | None = None) -> list[str]:
    """Write report.json, cmc.png, ranked_<slug>.png and index.html into `out_dir` (replaced
    atomically). reports: the report dicts; curves: label -> CMC array; ranked: report slug ->
    rows. Returns the file names written."""
    from contracts.storage import atomic_dir

    if not reports:
        raise ValueError("no reports to write")
    ranked = ranked or {}
    with atomic_dir(out_dir) as tmp:
        names = ["report.json"]
        payload = reports if len(reports) > 1 else reports[0]
        with open(os.path.join(tmp, "report.json"), "w") as f:
            f.write(json.dumps(payload, indent=2) + "\n")
        cmc_file = None
        if curves:
            cmc_file = "cmc.png"
            plot_cmc(curves, os.path.join(tmp, cmc_file), title=f"CMC: {title}")
            names.append(cmc_file)
        ranked_files = []
        for r in reports:
            slug = report_slug(r)
            if ranked.get(slug):
                name = f"ranked_{slug}.png"
                plot_ranked_lists(ranked[slug], os.path.join(tmp, name), report_label(r), read_image)
                ranked_files.append((report_label(r), name))
                names.append(name)
        with open(os.path.join(tmp, "index.html"), "w") as f:
            f.write(render_html(reports, cmc_file, ranked_files, title, notes))
        names.append("index.html")
    return names
