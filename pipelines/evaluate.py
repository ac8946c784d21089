"""Score a query set against a gallery: mAP, mINP and CMC@1/5/10/20/50 (DESIGN.md protocol).

Example:
    python pipelines/evaluate.py --query out/emb --query-split query \\
        --gallery out/emb --gallery-split gallery --mode centroid --out out/report.json

Re-ranking: --rerank none|kreciprocal|aqe|alpha-qe|dba|diffusion (comma-combinable, repeatable: each value
is evaluated and gets its own report). Junk ("-1") takes no part. k-reciprocal uses the exact
dense form for galleries up to --dense-max vectors and the scalable sparse form above (the report
says which in "rerank_form"). In centroid mode each query camera's centroid gallery is re-ranked
with that camera's queries (index/evaluation/reranked.py; the loop: index/evaluation/run.py).

Pictures: --report DIR writes DIR/report.json, cmc.png, ranked_<mode>_<rerank>.png for --samples
queries and index.html; --images (shards dir, manifest Parquet or dataset root) supplies the images:
    python pipelines/evaluate.py --query emb --query-split query --gallery emb --gallery-split gallery \\
        --mode both --rerank none --rerank kreciprocal --report out/eval --images out/shards
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import json

from pipelines._cli import make_parser, run_main
from pipelines._rerank import add_rerank_arguments, rerank_config


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--query", required=True, help="query embeddings (Parquet file or directory)")
    p.add_argument("--gallery", default=None, help="gallery embeddings (Parquet file or directory)")
    p.add_argument("--results", default=None,
                   help="score retrieved lists (query-results Parquet from query.py) instead of ranking the "
                        "whole gallery: metrics become mAP@k / CMC@k<=k, labelled so in the report")
    p.add_argument("--gallery-labels", default=None,
                   help="with --results: Parquet with image_id, item_id[, camera_id] of the whole gallery "
                        "(manifest or embeddings), to count each query's true matches")
    p.add_argument("--query-split", default=None,
                   help="keep only query rows of this split (when query and gallery share one file)")
    p.add_argument("--gallery-split", default=None, help="keep only gallery rows of this split")
    p.add_argument("--mode", default="instance", choices=["instance", "centroid", "both"],
                   help="instance: rank every gallery image; centroid: one centroid per item "
                        "(built without the query's camera when cameras are known)")
    p.add_argument("--chunk", type=int, default=None,
                   help="queries scored at a time (default: sized to keep one score block near 256 MB)")
    p.add_argument("--out", default=None,
                   help="report JSON path (a list of reports with --mode both or several --rerank); "
                        "required unless --report is given")
    add_rerank_arguments(p, repeatable=True)
    p.add_argument("--rerank-form", default="auto", choices=["auto", "dense", "sparse"],
                   help="k-reciprocal form: auto (dense up to --dense-max gallery vectors), dense, sparse")
    p.add_argument("--dense-max", type=int, default=20000,
                   help="largest gallery re-ranked with the exact dense k-reciprocal form (default 20000)")
    p.add_argument("--rerank-topk", type=int, default=100,
                   help="sparse k-reciprocal: re-ranked list length per query (default 100); "
                        "the rest of the gallery keeps the original-distance order")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write DIR/report.json, cmc.png, ranked-list PNGs and index.html")
    p.add_argument("--samples", type=int, default=8, help="sample queries in the ranked-list pictures (default 8)")
    p.add_argument("--images", default=None, metavar="SHARDS_DIR_OR_MANIFEST",
                   help="where report pictures come from: shards dir, manifest Parquet or dataset root "
                        "(without it the pictures show image ids)")
    p.add_argument("--image-root", default=None, help="dataset root for a manifest's relative paths")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from contracts.storage import write_text_atomic
    from index.evaluation.protocol import format_report
    from index.evaluation.reranked import is_reranked
    from index.evaluation.run import evaluate_files

    if args.chunk is not None and args.chunk < 1:
        raise ValueError("--chunk must be >= 1")
    if not args.out and not args.report:
        raise ValueError("give --out (report JSON) or --report DIR")
    if args.samples < 0 or args.dense_max < 1 or args.rerank_topk < 1:
        raise ValueError("--samples must be >= 0, --dense-max and --rerank-topk >= 1")
    configs = [rerank_config(m, args, topk=args.rerank_topk) for m in (args.rerank or ["none"])]
    if args.results:
        if any(is_reranked(c) for c in configs):
            raise ValueError("--rerank needs embeddings (--query/--gallery), not --results lists")
        return evaluate_results(args)
    if not args.gallery:
        raise ValueError("give --gallery (embeddings), or --results with --gallery-labels")
    if args.images and not args.report:
        raise ValueError("--images is for the --report pictures")
    modes = ["instance", "centroid"] if args.mode == "both" else [args.mode]
    run = evaluate_files(args.query, args.gallery, modes, configs, args.query_split, args.gallery_split,
                         log=lambda line: print(line, flush=True), chunk=args.chunk,
                         pictures=bool(args.report), samples=args.samples, dense_max=args.dense_max,
                         form=args.rerank_form)
    print(format_report(run.reports))
    payload = run.reports if len(run.reports) > 1 else run.reports[0]
    if args.out:
        write_text_atomic(args.out, json.dumps(payload, indent=2) + "\n")
        print(f"report: {args.out}")
    if args.report:
        write_report_dir(args, run.reports, run.curves, run.ranked, run.query, run.gallery)
    return 0


def write_report_dir(args, reports, curves, ranked, query, gallery) -> None:
    from index.evaluation.report import write_report

    read_image = None
    notes = [f"query: {args.query}" + (f" (split {args.query_split})" if args.query_split else "")
             + f"; gallery: {args.gallery}" + (f" (split {args.gallery_split})" if args.gallery_split else ""),
             ("Centroid-mode pictures show, for each retrieved item, its first gallery image not taken by "
             "the query's camera.")]
    if args.images:
        from pipelines._images import image_reader

        wanted = {t.image_id for rows in ranked.values() for r in rows for t in [r.query, *r.results]
                  if t.image_id is not None}
        read_image = image_reader(args.images, args.image_root, wanted)
    else:
        notes.append("No --images given: the pictures show image ids.")
    names = write_report(args.report, reports, curves, ranked, read_image, notes=notes)
    print(f"report directory: {args.report} ({', '.join(names)})")


def evaluate_results(args) -> int:
    import pyarrow.dataset as pads

    from contracts.storage import write_text_atomic
    from contracts.vectors import camera_array, open_dataset
    from index.evaluation.protocol import (
        format_report,
        make_report,
        per_query_metrics_from_results,
        results_scoring,
    )

    if not args.gallery_labels:
        raise ValueError("--results needs --gallery-labels (image_id, item_id[, camera_id] of the gallery)")

    def labels(path, split):
        ds = open_dataset(path)
        missing = {"image_id", "item_id"} - set(ds.schema.names)
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        cols = [c for c in ("image_id", "item_id", "camera_id") if c in ds.schema.names]
        flt = (pads.field("split") == split) if split and "split" in ds.schema.names else None
        t = ds.to_table(columns=cols, filter=flt)
        cams = camera_array(t.column("camera_id")) if "camera_id" in cols else None
        return t.column("item_id").to_pylist(), t.column("image_id").to_pylist(), cams

    q_items, q_ids, q_cams = labels(args.query, args.query_split)
    g_items, g_ids, g_cams = labels(args.gallery_labels, args.gallery_split)
    if not q_items:
        raise ValueError("query set is empty")
    results = open_dataset(args.results).to_table()
    missing = {"query_id", "rank", "item_id", "image_id", "score"} - set(results.column_names)
    if missing:
        raise ValueError(f"{args.results}: not query results, missing column(s) {', '.join(sorted(missing))}")
    pq_, k, mode = per_query_metrics_from_results(results, q_items, q_ids, q_cams, g_items, g_ids, g_cams)
    from contracts.results import results_metadata

    rerank = results_metadata(args.results).get("rerank")  # what query.py applied, if anything
    scoring = results_scoring(mode, q_cams is not None and g_cams is not None)
    report = make_report(pq_, mode, None if rerank in (None, "none") else rerank, at_k=k,
                         scoring=scoring, protocol=scoring == "protocol",
                         note=f"metrics@{k} from retrieved lists: AP@k divides by "
                         "min(k, true matches); CMC only up to k")
    report["cmc"] = {r: v for r, v in report["cmc"].items() if int(r) <= k}
    print(format_report(report))
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"report: {args.out}")
    if args.report:
        write_results_report(args, report, (q_ids, q_items, q_cams), (g_ids, g_cams))
    elif args.images:
        raise ValueError("--images is for the --report pictures")
    return 0


def write_results_report(args, report, query, gallery) -> None:
    """--results --report: the report page plus the retrieved lists of --samples queries drawn
    as pictures (coloured by the labels, as the full evaluation draws them)."""
    import numpy as np

    from contracts.results import read_ranked_lists
    from index.evaluation.report import report_slug, write_report
    from serving.pictures import results_rows

    q_ids, q_items, q_cams = query
    g_ids, g_cams = gallery
    lists = read_ranked_lists(args.results)
    known = set(q_ids)
    answered = [q for q in lists.query_ids if q in known]
    picks = sorted({answered[int(i)] for i in np.linspace(0, len(answered) - 1, min(args.samples, len(answered)))}) \
        if answered and args.samples else []
    rows = []
    if picks:
        lists = read_ranked_lists(args.results, query_ids=picks)
        cam = (lambda cams, i: None if cams is None or cams[i] is None or cams[i] < 0 else int(cams[i]))
        rows = results_rows(picks, lists.item_ids, lists.image_ids, lists.scores, lists.valid, top=10,
                            query_items=dict(zip(q_ids, q_items)),
                            query_cams={q: cam(q_cams, i) for i, q in enumerate(q_ids)},
                            gallery_cams={g: cam(g_cams, i) for i, g in enumerate(g_ids)})
    read_image = None
    notes = [f"results: {args.results}"]
    if args.images:
        from pipelines._images import image_reader

        wanted = {t.image_id for r in rows for t in [r.query, *r.results] if t.image_id is not None}
        read_image = image_reader(args.images, args.image_root, wanted)
    elif rows:
        notes.append("No --images given: the pictures show image ids.")
    if rows and lists.image_ids is None:
        notes.append("Centroid-mode results have no gallery image: the tiles show item ids.")
    names = write_report(args.report, [report], ranked={report_slug(report): rows} if rows else None,
                         read_image=read_image, notes=notes)
    print(f"report directory: {args.report} ({', '.join(names)})")


if __name__ == "__main__":
    run_main(main)
