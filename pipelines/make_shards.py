"""Ingest a labelled image dataset into WebDataset shards plus a manifest (DESIGN.md contracts).

Writes OUT/manifest.parquet (one row per accepted image), OUT/rejected.parquet (path, reason
for every file that failed: corrupt, empty, not an image, too large, bad name, missing) and
OUT/shards/<split>-NNNNNN.tar. The output appears only when complete: it is built in a
temporary directory beside OUT and swapped into place (a previous OUT is kept until then).
The same input always gives byte-identical output.

Formats:
  market1501  ROOT/{bounding_box_train,query,bounding_box_test}/PPPP_cC....jpg
              (train, query, gallery; item "-1" junk and "0" distractor kept)
  folders     ROOT/<item_id>/<image>: splits by --train-fraction / --query-per-item
  manifest    --manifest FILE (CSV or Parquet): path,item_id[,camera_id][,split], paths
              relative to ROOT; a path leaving ROOT is refused

Example:
    python pipelines/make_shards.py --format market1501 \\
        --root ../shared/data/market1501_mini/Market-1501-v15.09.15 --out outputs/market_mini
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import os
import time

from pipelines._cli import make_parser, run_main


def build_parser() -> argparse.ArgumentParser:
    from model.ingest import DEFAULT_MAX_PIXELS
    from model.shards import DEFAULT_SHARD_SIZE

    p = make_parser(__doc__)
    p.add_argument("--format", required=True, choices=["market1501", "folders", "manifest"],
                   help="dataset layout under --root")
    p.add_argument("--root", required=True, help="dataset root; image ids are paths relative to it")
    p.add_argument("--out", required=True,
                   help="output directory (replaced atomically; must be empty, absent or an "
                        "earlier make_shards output)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--resize", default=None, metavar="HxW",
                   help="re-encode every image at this size, e.g. 256x128 (default: keep the "
                        "original bytes)")
    p.add_argument("--query-per-item", type=int, default=1,
                   help="folders/manifest without split: query images per test item (default 1)")
    p.add_argument("--train-fraction", type=float, default=0.5,
                   help="folders/manifest without split: fraction of items (in sorted item order) "
                        "used for training (default 0.5)")
    p.add_argument("--manifest", default=None,
                   help="--format manifest: CSV or Parquet file (default ROOT/manifest.csv|.parquet)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"reject images with more pixels (decompression-bomb guard, default "
                        f"{DEFAULT_MAX_PIXELS})")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that decode-check images (default: min(4, CPUs))")
    return p


def check_out_dir(out: str, root: str) -> None:
    """Refuse an --out that would destroy something that is not an earlier output."""
    from contracts.storage import check_writable, is_uri, resolve

    if is_uri(out):  # object storage: the same rule, asked through pyarrow
        check_writable(out)
        import pyarrow.fs as pafs

        fs, p = resolve(out)
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.File:
            raise NotADirectoryError(f"--out {out} exists and is not a directory")
        if info.type == pafs.FileType.Directory:
            names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(p))}
            if names and "manifest.parquet" not in names:
                raise ValueError(f"--out {out} is a non-empty directory that is not a make_shards "
                                 "output; refusing to replace it")
        return
    out_r, root_r = os.path.realpath(out), os.path.realpath(root)
    if out_r == root_r or out_r.startswith(root_r + os.sep) or root_r.startswith(out_r + os.sep):
        raise ValueError(f"--out {out} must not contain or be inside --root {root}")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise NotADirectoryError(f"--out {out} exists and is not a directory")
        entries = set(os.listdir(out))
        if entries and "manifest.parquet" not in entries:
            raise ValueError(f"--out {out} is a non-empty directory that is not a make_shards "
                             f"output; refusing to replace it")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from contracts.storage import atomic_dir
    from model.ingest import CheckConfig, build_dataset, parse_hw, scan_dataset

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    config = CheckConfig(max_pixels=args.max_pixels,
                         resize=parse_hw(args.resize, "--resize") if args.resize else None)
    check_out_dir(args.out, args.root)

    t0 = time.perf_counter()
    scan = scan_dataset(args.format, args.root, args.manifest, args.query_per_item,
                        args.train_fraction)
    print(f"found {len(scan.rows)} images under {args.root} "
          f"({len(scan.rejected)} other files rejected)", flush=True)

    step = max(1000, len(scan.rows) // 20)

    def progress(split: str, done: int, total: int) -> None:
        if done % step == 0 or done == total:
            print(f"  {split}: {done}/{total} checked", flush=True)

    with atomic_dir(args.out) as tmp:
        summary = build_dataset(scan, args.root, tmp, config, args.shard_size, args.workers,
                                progress)
    dt = time.perf_counter() - t0
    total = sum(summary.counts.values())
    for split, n in summary.counts.items():
        print(f"{split:8s} {n:8d} images {summary.items[split]:7d} items "
              f"{summary.shards.get(split, 0):5d} shards")
    print(f"rejected {summary.rejected}")
    print(f"wrote {args.out} in {dt:.1f} s ({total / dt:.0f} images/s)")
    return 0


if __name__ == "__main__":
    run_main(main)
