"""Search an index with images: no manifest, no labels, no embeddings file.

    python pipelines/search.py --index indexes/market --images photos/ --k 10 --out results/ \\
        [--rerank aqe] [--report report/ --gallery-images shards/]

PATH (--images, any number): an image file, a folder (searched recursively) or a text/CSV list
of image paths. The images are embedded with the index's own model (the model directory the
index version records; --model must be that same model), searched, re-ranked, and written as
the query-results contract (OUT/part-NNNNN.parquet; query_id = the path as given, relative to
its folder). An unreadable image is a row of OUT/_errors.parquet, never a failed run.
--report DIR draws each query image and its ranked gallery pictures (DIR/index.html); the
gallery pictures come from --gallery-images (shards dir, manifest Parquet or dataset root).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001


from index.rerank.chain import method_name, rerank_params
from pipelines._cli import add_log_arguments, log_options, make_parser, run_main
from pipelines._rerank import add_rerank_arguments, rerank_config


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--index", required=True, help="ROOT/NAME (the version CURRENT names) or a version dir")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files, folders (recursive) or text/CSV lists of image paths")
    p.add_argument("--k", type=int, default=10, help="results per query image (default 10)")
    p.add_argument("--out", required=True, help="results directory (replaced atomically)")
    p.add_argument("--model", default=None, metavar="MODEL_DIR",
                   help="model directory (default: the one recorded with the index version; must match it)")
    p.add_argument("--batch-size", type=int, default=64, help="images embedded at a time (default 64)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the index files")
    add_rerank_arguments(p)
    p.add_argument("--gallery-vectors", default=None,
                   help="with --rerank: the vectors the index was built from (default: the manifest's source)")
    p.add_argument("--report", default=None, metavar="DIR", help="write DIR/index.html with the ranked pictures")
    p.add_argument("--gallery-images", default=None, metavar="SHARDS_OR_ROOT",
                   help="with --report: where gallery pictures come from (shards dir, manifest Parquet "
                        "or dataset root; without it the tiles show image ids)")
    add_log_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.quiet = log_options().quiet
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.gallery_images and not args.report:
        raise ValueError("--gallery-images is for the --report pictures")
    config = rerank_config(args.rerank, args, topk=args.k)
    from serving.batch import search_to_results
    from serving.engine import SearchEngine
    from serving.inputs import collect_images

    queries = collect_images(args.images)
    engine = SearchEngine(args.index, model_dir=args.model, verify=not args.no_verify)
    try:
        say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
        say(f"index {args.index} version {engine.version}: {len(engine.index)} vectors, model "
            f"{engine.model_id}; {len(queries)} query image(s)")
        meta = {"index": str(args.index), "version": engine.version, "k": args.k, "model": engine.model_id,
                "mode": "instance" if engine.index.has_images else "centroid",
                "rerank": method_name(config), "queries": "images"}
        if config.methods != ("none",):
            meta["rerank_params"] = rerank_params(config)
        run, answered = search_to_results(engine, queries, args.k, args.out, config, meta,
                                          args.batch_size, args.quiet, args.gallery_vectors)
    finally:
        engine.close()
    print(f"wrote {run.rows} rows for {run.answered} queries to {args.out}"
        + (f"; {run.errors} image(s) could not be used (see {args.out}/_errors.parquet)" if run.errors else ""))
    if args.report:
        write_report(args, queries, answered)
        print(f"report: {args.report}/index.html")
    if not run.answered:
        print(f"error: none of the {len(queries)} image(s) could be used (see {args.out}/_errors.parquet)",
              file=sys.stderr)
        return 1
    return 0


def write_report(args, queries, answered) -> None:
    import numpy as np

    from serving.pictures import QUERY_PREFIX, results_rows, write_search_report

    done = [q for q in queries if q.query_id in answered]
    if not done:
        return
    rows = [answered[q.query_id] for q in done]
    stack = (lambda j: np.stack([r[j] for r in rows]))
    has_images = rows[0][1] is not None
    ranked = results_rows([q.query_id for q in done], stack(0), stack(1) if has_images else None,
                          stack(2), stack(3), top=min(args.k, 10),
                          query_tile_ids=[QUERY_PREFIX + q.query_id for q in done])
    paths = {QUERY_PREFIX + q.query_id: q.path for q in done}
    gallery = None
    if args.gallery_images:
        from pipelines._images import image_reader

        wanted = {t.image_id for r in ranked for t in r.results if t.image_id is not None}
        gallery = image_reader(args.gallery_images, None, wanted)

    def read_image(image_id):
        from PIL import Image

        if image_id in paths:
            return Image.open(paths[image_id])
        return gallery(image_id) if gallery is not None else None

    notes = [f"index: {args.index}; queries: {' '.join(args.images)}"]
    if not args.gallery_images:
        notes.append("No --gallery-images given: gallery tiles show image ids.")
    write_search_report(args.report, ranked, read_image, "Image search", notes)


if __name__ == "__main__":
    run_main(main)
