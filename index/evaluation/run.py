"""One evaluation run: every (mode, re-ranking) pair of a query set against a gallery -> reports.

`evaluate_tables` works on loaded VectorTables, `evaluate_files` reads the embeddings first;
pipelines/evaluate.py only parses its flags, calls `evaluate_files` and writes what it returns.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from index.evaluation import metrics as M
from index.evaluation.protocol import label_codes, make_report
from index.evaluation.report import RankedRow, Tile, report_label, report_slug
from index.evaluation.reranked import DENSE_MAX, choose_sample_rows, evaluate_ranked, is_reranked
from index.rerank.chain import RerankConfig, method_name, rerank_params

__all__ = ["EvaluationRun", "evaluate_files", "evaluate_tables", "ranked_rows"]


@dataclass
class EvaluationRun:
    """reports: one report dict per (mode, config), modes outer; curves: report label -> CMC
    curve (50,) float64; ranked: report slug -> RankedRow list of the sample queries (both
    empty without pictures); query / gallery: the tables evaluated."""

    reports: list[dict]
    curves: dict = field(default_factory=dict)
    ranked: dict = field(default_factory=dict)
    query: object = None
    gallery: object = None


def evaluate_tables(query, gallery, modes: Sequence[str], reranks: Sequence[RerankConfig | None],
                    chunk: int | None = None, pictures: bool = False, samples: int = 8,
                    dense_max: int = DENSE_MAX,
                    form: str = "auto", log: Callable[[str], None] = lambda _: None) -> EvaluationRun:
    """Evaluate VectorTable `query` against VectorTable `gallery` in each mode ("instance",
    "centroid") with each re-ranking config (None = plain cosine). pictures: also return the
    CMC curves and the ranked lists of `samples` sample queries (for report pictures)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if samples < 0 or dense_max < 1:
        raise ValueError(f"samples must be >= 0 and dense_max >= 1, got {samples}, {dense_max}")
    sample_rows = []
    if pictures and len(query) and len(gallery):
        sample_rows = choose_sample_rows(label_codes(query, gallery), samples)
    run = EvaluationRun([], query=query, gallery=gallery)
    for mode in modes:
        for config in reranks:
            t1 = time.perf_counter()
            ev = evaluate_ranked(query, gallery, mode, config, chunk, sample_rows, dense_max=dense_max, form=form)
            extra = {}
            if is_reranked(config):
                extra = {"rerank_params": rerank_params(config)}
                if ev.form:  # k-reciprocal: "dense" (exact) or "sparse" (scalable)
                    extra["rerank_form"] = ev.form
            name = method_name(config) if config is not None else None
            report = make_report(ev.per_query, mode, rerank=name, **extra)
            run.reports.append(report)
            log(f"{mode} {name or 'none'}: scored in {time.perf_counter() - t1:.1f}s")
            if pictures:
                run.curves[report_label(report)] = M.cmc_curve(ev.per_query, 50)
                run.ranked[report_slug(report)] = ranked_rows(ev.samples, query, gallery)
    return run


def evaluate_files(query: str, gallery: str, modes: Sequence[str], reranks: Sequence[RerankConfig | None],
                   query_split: str | None = None, gallery_split: str | None = None,
                   log: Callable[[str], None] = lambda _: None, **kwargs) -> EvaluationRun:
    """Read the query and gallery embeddings (Parquet file or directory, optionally one split
    each), then `evaluate_tables(..., **kwargs)`."""
    from contracts.vectors import read_vectors

    t0 = time.perf_counter()
    q = read_vectors(query, kind="embeddings", split=query_split)
    g = read_vectors(gallery, kind="embeddings", split=gallery_split)
    log(f"loaded {len(q)} queries, {len(g)} gallery images (D={g.meta.dim}) in {time.perf_counter() - t0:.1f}s")
    return evaluate_tables(q, g, modes, reranks, log=log, **kwargs)


def ranked_rows(samples, query, gallery) -> list[RankedRow]:
    """RankedSample list (ids as rows) -> RankedRow list (image ids and captions) for pictures."""
    def cam(table, row):
        return "" if table.camera_ids is None else f" c{table.camera_ids[row]}"

    rows = []
    for s in samples:
        q = Tile(query.image_ids[s.query_row], f"{query.item_ids[s.query_row]}{cam(query, s.query_row)}", "query")
        tiles = []
        for g_row, item, status, score in zip(s.gallery_rows, s.items, s.status, s.scores):
            image = gallery.image_ids[g_row] if g_row >= 0 else None
            tiles.append(Tile(image, f"{item}{cam(gallery, g_row) if g_row >= 0 else ''}\n{score:.3f}", status))
        rows.append(RankedRow(q, tiles))
    return rows
