"""Write a synthetic Market-1501-layout dataset of procedurally drawn, learnable identities.

OUT/bounding_box_train (train items), OUT/query and OUT/bounding_box_test (test items, plus
-1 junk and 0000 distractors in the gallery), names PPPP_cCsS_FFFFFF_NN.jpg. Train and test
identities are disjoint: items 1..round(F*N) train, the rest test (see model/synthetic.py).
The same arguments and seed always give the same images. OUT appears only when complete.

Example (300,000 images of 64x32):
    python pipelines/make_synthetic.py --items 10000 --images-per-item 30 --cameras 6 \\
        --size 64x32 --out outputs/synthetic
then: python pipelines/make_shards.py --format market1501 --root outputs/synthetic --out ...
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import os
import time

from pipelines._cli import make_parser, run_main


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--items", type=int, required=True, help="number of identities")
    p.add_argument("--images-per-item", type=int, required=True, help="images of each identity")
    p.add_argument("--cameras", type=int, default=6, help="number of cameras (default 6)")
    p.add_argument("--size", default="64x32", metavar="HxW", help="image size (default 64x32)")
    p.add_argument("--out", required=True, help="output dataset directory (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--train-fraction", type=float, default=0.5,
                   help="fraction of items (lowest ids) used for training (default 0.5)")
    p.add_argument("--query-per-item", type=int, default=1,
                   help="query images per test item (default 1; at most images-per-item - 1)")
    p.add_argument("--junk", type=int, default=None,
                   help="-1 junk images in the gallery (default 2%% of the gallery)")
    p.add_argument("--distractors", type=int, default=None,
                   help="0000 distractor images in the gallery (default 2%% of the gallery)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes drawing images (default: all CPUs)")
    return p


def check_out_dir(out: str) -> None:
    """Refuse to replace a directory that is not an earlier synthetic dataset."""
    from model.synthetic import GALLERY_DIR, QUERY_DIR, TRAIN_DIR

    if os.path.exists(out):
        if not os.path.isdir(out):
            raise NotADirectoryError(f"--out {out} exists and is not a directory")
        entries = set(os.listdir(out))
        if entries and not entries <= {TRAIN_DIR, QUERY_DIR, GALLERY_DIR}:
            raise ValueError(f"--out {out} is a non-empty directory that is not a dataset written "
                             f"by make_synthetic; refusing to replace it")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from contracts.storage import atomic_dir
    from model.ingest import parse_hw
    from model.synthetic import SyntheticConfig, write_dataset

    cfg = SyntheticConfig(items=args.items, images_per_item=args.images_per_item,
                          cameras=args.cameras, size=parse_hw(args.size, "--size"),
                          seed=args.seed, train_fraction=args.train_fraction,
                          query_per_item=args.query_per_item, junk=args.junk,
                          distractors=args.distractors).validate()
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    check_out_dir(args.out)
    step = [0]

    def progress(done: int, total: int) -> None:
        if done * 10 // max(total, 1) > step[0] or done == total:
            step[0] = done * 10 // max(total, 1)
            print(f"  {done}/{total} images", flush=True)

    t0 = time.perf_counter()
    with atomic_dir(args.out) as tmp:
        counts = write_dataset(cfg, tmp, args.workers, progress)
    dt = time.perf_counter() - t0
    for folder, n in counts.items():
        print(f"{folder:20s} {n:8d}")
    total = sum(counts.values())
    print(f"wrote {total} images to {args.out} in {dt:.1f} s ({total / dt:.0f} images/s)")
    return 0


if __name__ == "__main__":
    run_main(main)
