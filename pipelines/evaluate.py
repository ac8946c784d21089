"""Score a query set against a gallery: mAP, mINP and CMC@1/5/10/20/50 (DESIGN.md protocol).

Example:
    python pipelines/evaluate.py --query out/emb --query-split query \\
        --gallery out/emb --gallery-split gallery --mode centroid --out out/report.json
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import argparse
import json
import time

from pipelines._cli import run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--out", required=True, help="report JSON path (a list of reports with --mode both)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from index.evaluation import format_report, make_report, per_query_metrics
    from index.storage import write_text_atomic
    from index.vectors import read_vectors

    if args.chunk is not None and args.chunk < 1:
        raise ValueError("--chunk must be >= 1")
    if args.results:
        return evaluate_results(args)
    if not args.gallery:
        raise ValueError("give --gallery (embeddings), or --results with --gallery-labels")
    t0 = time.perf_counter()
    query = read_vectors(args.query, kind="embeddings", split=args.query_split)
    gallery = read_vectors(args.gallery, kind="embeddings", split=args.gallery_split)
    print(f"loaded {len(query)} queries, {len(gallery)} gallery images (D={gallery.meta.dim}) "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    modes = ["instance", "centroid"] if args.mode == "both" else [args.mode]
    reports = []
    for mode in modes:
        t1 = time.perf_counter()
        pq = per_query_metrics(query, gallery, mode, args.chunk)
        reports.append(make_report(pq, mode))
        print(f"{mode}: scored in {time.perf_counter() - t1:.1f}s", flush=True)
    print(format_report(reports))
    payload = reports if len(reports) > 1 else reports[0]
    write_text_atomic(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"report: {args.out}")
    return 0


def evaluate_results(args) -> int:
    import pyarrow.dataset as pads

    from index.evaluation import format_report, make_report, per_query_metrics_from_results
    from index.storage import write_text_atomic
    from index.vectors import camera_array, open_dataset

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
    report = make_report(pq_, mode, at_k=k, note=f"metrics@{k} from retrieved lists: AP@k divides by "
                         "min(k, true matches); CMC only up to k")
    report["cmc"] = {r: v for r, v in report["cmc"].items() if int(r) <= k}
    print(format_report(report))
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
