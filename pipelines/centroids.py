"""Per-item centroids from an embeddings directory: a distributed groupby-mean on Ray Data.

    python pipelines/centroids.py --embeddings OUT/embeddings --out OUT/centroids

1. each input batch is reduced to partial sums per (item, camera) on the worker that read it
   (index.centroids.aggregate.partial_table), tagged with a hash bucket of the item id;
2. the partial rows are shuffled by bucket (Ray Data groupby) and each bucket's rows are
   combined into one row per item (index.centroids.aggregate.combine_table): no node ever holds all
   embeddings, only its buckets' partial sums;
3. the driver streams the item rows into OUT/centroids.parquet (DESIGN centroids contract) and
   OUT/item_camera_sums.parquet (item_id, camera_id, sum fixed_size_list<float32>[D] (float64 with --sums-dtype float64), count),
   the per-(item, camera) sums that centroid-mode evaluation with camera exclusion and nightly
   updates of touched items need.
OUT appears only when both files are complete (temporary directory, then rename).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import math
import time

from pipelines._cli import add_ray_arguments, init_ray, make_parser, run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", required=True,
                   help="embeddings Parquet file or directory (the embeddings contract)")
    p.add_argument("--out", required=True,
                   help="output directory: centroids.parquet + item_camera_sums.parquet (replaced atomically)")
    p.add_argument("--split", default=None,
                   help="use only embeddings rows of this split (e.g. gallery); default: all rows")
    p.add_argument("--batch-size", type=int, default=8192,
                   help="rows per partial-sum batch (default 8192)")
    p.add_argument("--buckets", type=int, default=0,
                   help="hash buckets for the shuffle by item (default: enough for ~64 MB of input each, "
                        ">= 2 per CPU)")
    p.add_argument("--sums-dtype", choices=["float32", "float64"], default="float32",
                   help="how the shuffled partial sums and item_camera_sums.parquet store sums (always "
                        "accumulated in float64; float32, the default, halves shuffle memory and the file "
                        "at a relative rounding of 6e-8; float64 keeps exact sums)")
    add_ray_arguments(p)
    return p.parse_args(argv)


def _user_error(e: BaseException) -> BaseException:
    """The VectorFileError behind a Ray task failure (Ray wraps it), else `e` itself."""
    from contracts.vectors import VectorFileError

    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, VectorFileError):
            return VectorFileError(str(cur).strip().splitlines()[-1] if "\n" in str(cur) else str(cur))
        cur = getattr(cur, "cause", None) or cur.__cause__
    text = str(e)
    marker = "VectorFileError: "
    if marker in text:  # Ray may only keep the formatted traceback
        return VectorFileError(text.split(marker)[-1].strip().splitlines()[0])
    return e


def main(argv=None) -> int:
    args = parse_args(argv)
    import pyarrow.parquet as pq

    from contracts.storage import atomic_dir, resolve
    from contracts.vectors import VectorFileError, check_files_agree, check_schema, open_dataset
    from index.centroids import aggregate as C

    ds_meta = open_dataset(args.embeddings)
    meta = check_schema(ds_meta.schema, "embeddings", args.embeddings)
    check_files_agree(ds_meta, args.embeddings)  # every file: same model and embedding type
    files = list(ds_meta.files)
    rows = sum(f.metadata.num_rows for f in ds_meta.get_fragments())
    if not files or rows == 0:
        raise VectorFileError(f"{args.embeddings}: no embeddings rows")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    cols = ["item_id", "embedding"] + [c for c in ("camera_id", "split") if c in ds_meta.schema.names]
    if args.split is not None and "split" not in ds_meta.schema.names:
        raise VectorFileError(f"{args.embeddings}: no split column to select --split {args.split}")
    input_bytes = rows * meta.dim * 4

    init_ray(args.address, args.num_cpus)
    import ray
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", 1))
    buckets = args.buckets or max(2 * cpus, math.ceil(input_bytes / (64 << 20)))
    print(f"centroids: {rows} embeddings (dim {meta.dim}, model {meta.model}) in {len(files)} file(s), "
          f"{buckets} buckets", flush=True)
    t0 = time.perf_counter()

    fs, _ = resolve(args.embeddings)
    ctx = ray.data.DataContext.get_current()
    # task-based sort shuffle: no long-lived shuffle actors (the hash-shuffle aggregators cost
    # seconds to start and we saw one abort on a Ray-internal mutex check on a 2-CPU machine)
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(cols)
    if args.split is not None:  # an expression, so Ray can push it down into the Parquet scan
        from ray.data.expressions import col

        ds = ds.filter(expr=col("split") == args.split)
    partials = ds.map_batches(C.partial_table, batch_format="pyarrow", batch_size=args.batch_size,
                              fn_kwargs={"buckets": buckets, "dtype": args.sums_dtype,
                                         "normalized": meta.normalized})
    items = partials.groupby("bucket", num_partitions=buckets).map_groups(C.combine_table, batch_format="pyarrow",
                                                                    fn_kwargs={"dtype": args.sums_dtype})

    n_items = n_pairs = n_images = 0
    try:
        with atomic_dir(args.out) as tmp:
            cw = sw = None
            try:
                for batch in items.iter_batches(batch_format="pyarrow", batch_size=None):
                    if batch.num_rows == 0:
                        continue
                    cents, sums = C.split_item_rows(batch, meta.model)
                    if cw is None:
                        cw = pq.ParquetWriter(f"{tmp}/centroids.parquet", cents.schema)
                        sw = pq.ParquetWriter(f"{tmp}/item_camera_sums.parquet", sums.schema)
                    cw.write_table(cents)
                    sw.write_table(sums)
                    n_items += cents.num_rows
                    n_pairs += sums.num_rows
                    n_images += int(sum(cents.column("count").to_pylist()))
            finally:
                for w in (cw, sw):
                    if w is not None:
                        w.close()
            if n_items == 0:
                raise VectorFileError(f"{args.embeddings}: no embeddings rows"
                                      + (f" of split {args.split}" if args.split else ""))
    except Exception as e:  # noqa: BLE001 -- unwrap Ray's task errors into the one-line reason
        raise _user_error(e) from None
    dt = time.perf_counter() - t0
    print(f"centroids: {n_items} items from {n_images} embeddings, {n_pairs} (item, camera) pairs "
          f"in {dt:.1f}s -> {args.out}/centroids.parquet, {args.out}/item_camera_sums.parquet", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
