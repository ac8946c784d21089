"""Ranked lists as pictures: index.evaluation.report rows built from results (no embeddings needed).

`results_rows` turns query-results lists into `index.evaluation.report.RankedRow`s. With labels (the
query's item and camera, the gallery's cameras) each tile is coloured as the evaluation does
(green match, red wrong, grey ignored: same item and camera, or junk); without labels (search
with unlabelled photos) tiles are plain ("result"). `write_search_report` draws search.py's
lists with index.evaluation.report's picture code, 8 queries a picture, plus an index.html.
"""
from __future__ import annotations

import html
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["QUERY_PREFIX", "results_rows", "write_search_report"]

QUERY_PREFIX = "query:"  # a query tile's image id, kept apart from gallery image ids
ROWS_PER_PICTURE = 8


def results_rows(query_ids: Sequence[str], item_ids: np.ndarray, image_ids: np.ndarray | None,
                 scores: np.ndarray, valid: np.ndarray, top: int = 10,
                 query_items: Mapping[str, str] | None = None,
                 query_cams: Mapping[str, object] | None = None,
                 gallery_cams: Mapping[str, object] | None = None, query_tile_ids=None) -> list:
    """(Q, k) ranked lists -> Q index.evaluation.report.RankedRow of the first `top` results.

    query_items / query_cams: query_id -> item / camera (evaluate --results); gallery_cams:
    gallery image_id -> camera. query_tile_ids: what each query tile reads (default query_id)."""
    from index.evaluation.report import RankedRow, Tile

    rows = []
    for i, qid in enumerate(query_ids):
        q_item = None if query_items is None else query_items.get(qid)
        q_cam = None if query_cams is None else query_cams.get(qid)
        qtile = query_tile_ids[i] if query_tile_ids is not None else qid
        caption = str(qid) if q_item is None else f"{q_item}" + ("" if q_cam is None else f" c{q_cam}")
        tiles = []
        for r in np.flatnonzero(valid[i])[:top]:
            item = item_ids[i, r]
            image = None if image_ids is None else image_ids[i, r]
            status = "result"
            if q_item is not None:
                g_cam = None if gallery_cams is None or image is None else gallery_cams.get(image)
                if item == "-1" or (item == q_item and q_cam is not None and g_cam == q_cam):
                    status = "ignored"
                else:
                    status = "match" if item == q_item else "wrong"
            tiles.append(Tile(image, f"{item}\n{float(scores[i, r]):.3f}", status))
        rows.append(RankedRow(Tile(qtile, caption[:24], "query"), tiles))
    return rows


def write_search_report(out_dir: str, rows: list, read_image: Callable[[str], object] | None,
                        title: str, notes: Sequence[str] = ()) -> list[str]:
    """OUT/ranked_NNN.png (8 queries each) and OUT/index.html, replaced atomically. Returns
    the file names."""
    from contracts.storage import atomic_dir
    from index.evaluation.report import plot_ranked_lists

    names = []
    with atomic_dir(out_dir) as tmp:
        for n, s in enumerate(range(0, len(rows), ROWS_PER_PICTURE)):
            name = f"ranked_{n:03d}.png"
            part = rows[s:s + ROWS_PER_PICTURE]
            plot_ranked_lists(part, os.path.join(tmp, name), f"{title} ({s + 1}-{s + len(part)})", read_image)
            names.append(name)
        page = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
                "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%;border:1px solid #ddd}</style>",
                "</head><body>", f"<h1>{html.escape(title)}</h1>",
                ("<p>Each row: the query image (blue border), then its ranked gallery images with the "
                 "item id and score under each.</p>")]
        page += [f"<p>{html.escape(n)}</p>" for n in notes]
        page += [f"<img src='{n}' alt='ranked lists {i + 1}'>" for i, n in enumerate(names)]
        page.append("</body></html>")
        with open(os.path.join(tmp, "index.html"), "w") as f:
            f.write("\n".join(page) + "\n")
        names.append("index.html")
    return names
