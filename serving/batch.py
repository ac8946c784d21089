"""search.py's work: query images from disk -> query-results contract (+ error rows, + report).

Images are embedded in batches; an unreadable or undecodable image becomes a row of
OUT/_errors.parquet (query_id, reason), never a failed run (the leading "_" keeps it out of
the results dataset, as embed.py's _errors.parquet). All images are searched together when
re-ranking (k-reciprocal compares the queries with each other), else batch by batch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from serving.inputs import QueryImage, read_query_bytes

__all__ = ["SearchRun", "search_to_results"]

ERRORS_FILE = "_errors.parquet"


@dataclass
class SearchRun:
    """What a run did: queries answered, error rows, results rows written."""

    answered: int
    errors: int
    rows: int


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="search", disable=quiet or None, file=sys.stderr)


def search_to_results(engine, queries: list[QueryImage], k: int, out: str, rerank=None,
                      meta: dict | None = None, batch_size: int = 64, quiet: bool = False,
                      gallery_vectors: str | None = None) -> tuple[SearchRun, dict]:
    """Embed and search `queries` with `engine` (serving.engine.SearchEngine); write OUT
    (results parts + _errors.parquet) atomically. Returns (SearchRun, {query_id: Ranked row
    index data}) where the second item maps each answered query id to (item_ids, image_ids,
    scores, valid) rows for a report."""
    from contracts.results import ResultsWriter, make_results_table

    reranked = rerank is not None and tuple(rerank.methods) != ("none",)
    errors: list[tuple[str, str]] = []
    answered: dict = {}
    pending_ids, pending_vecs = [], []
    bar = _progress(len(queries), quiet)
    with ResultsWriter(out, meta or {}) as w:
        for s in range(0, len(queries), batch_size):
            chunk = queries[s:s + batch_size]
            read = [read_query_bytes(q) for q in chunk]
            res = engine.embed([b for b, _ in read])
            for q, (_, read_err), ok, why in zip(chunk, read, res.ok, res.reasons):
                if not ok:
                    errors.append((q.query_id, read_err or why or "unusable image"))
            ids = [q.query_id for q, ok in zip(chunk, res.ok) if ok]
            vecs = res.embeddings[res.ok]
            if ids and reranked:
                pending_ids += ids
                pending_vecs.append(vecs)
            elif ids:
                _write(w, ids, engine.search_vectors(vecs, k), answered, make_results_table)
            bar.update(len(chunk))
        if pending_ids:
            ranked = engine.search_vectors(np.concatenate(pending_vecs), k, rerank, gallery_vectors)
            _write(w, pending_ids, ranked, answered, make_results_table)
        err_table = pa.table({"query_id": pa.array([e[0] for e in errors], pa.string()),
                              "reason": pa.array([e[1] for e in errors], pa.string())})
        pq.write_table(err_table, os.path.join(w.tmp_dir, ERRORS_FILE))
        rows = w.rows
    bar.close()
    return SearchRun(len(answered), len(errors), rows), answered


def _write(w, ids, ranked, answered, make_results_table) -> None:
    w.write(make_results_table(ids, ranked.item_ids, ranked.image_ids, ranked.scores, ranked.valid))
    for i, qid in enumerate(ids):
        answered[qid] = (ranked.item_ids[i], None if ranked.image_ids is None else ranked.image_ids[i],
                         ranked.scores[i], ranked.valid[i])
