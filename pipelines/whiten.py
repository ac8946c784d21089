"""PCA-whitening / dimension reduction of embeddings: fit on a gallery, apply to any vectors.

Fit (streams the file, never holds it whole; rows of --split only, default "gallery"):
    python pipelines/whiten.py --embeddings out/emb --dim 256 --out out/pcaw256.npz

Apply (queries, gallery or centroids; writes a new embeddings/centroids Parquet whose metadata
has dim D and model "<model>+pcaw<D>"; every vector re-L2-normalised):
    python pipelines/whiten.py --apply out/pcaw256.npz --embeddings out/emb --out out/emb_w256

A transform fitted at a large --dim can be applied at any smaller one with --dim (it keeps the
leading components), so one fit serves a whole dimension sweep. Keep the .npz beside the index
version built from the whitened vectors: queries must go through the same file.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import time

from pipelines._cli import make_parser, run_main


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--embeddings", required=True,
                   help="input embeddings or centroids (Parquet file or directory, any pyarrow URI)")
    p.add_argument("--apply", default=None, metavar="FILE.npz",
                   help="apply this fitted whitening instead of fitting one")
    p.add_argument("--dim", type=int, default=None,
                   help="output dimension (fit: required, 1..input dim, e.g. 32..2048; "
                        "apply: optional, keep only the leading DIM components of the file)")
    p.add_argument("--out", required=True,
                   help="fit: the .npz to write; apply: output directory (local) or a single "
                        "'.parquet' file (any pyarrow URI)")
    p.add_argument("--split", default="gallery",
                   help="fit: use only rows of this split when the file has a split column "
                        "('all' = every row; default: gallery, so queries never leak in)")
    p.add_argument("--power", type=float, default=1.0,
                   help="fit: eigenvalue power, scale = lambda^(-power/2): 1 whitening, 0.5 "
                        "power-law, 0 plain PCA (default 1)")
    p.add_argument("--shrinkage", type=float, default=0.0,
                   help="fit: shrink eigenvalues towards their mean, 0..1 (needed when DIM >= the "
                        "number of training vectors; default 0)")
    p.add_argument("--batch-size", type=int, default=65536, help="rows read at a time")
    p.add_argument("--rows-per-file", type=int, default=1_000_000,
                   help="apply, directory output: rows per part-NNNNN.parquet file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from index.ann.whitening import (
        apply_whitening_file,
        fit_whitening_file,
        load_whitening,
        whitened_model_id,
    )

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    t0 = time.perf_counter()
    if args.apply:
        w = load_whitening(args.apply)
        if args.dim is not None:
            w = w.truncate(args.dim)
        rows = apply_whitening_file(args.embeddings, args.out, w, args.batch_size,
                                    args.rows_per_file)
        print(f"whitened {rows} vectors {w.input_dim} -> {w.dim} "
              f"(model {whitened_model_id(w.model or '?', w.dim)}) in "
              f"{time.perf_counter() - t0:.1f}s: {args.out}")
        return 0
    if args.dim is None:
        raise ValueError("fitting needs --dim (or give --apply FILE.npz)")
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out {args.out}: a fitted whitening is written as a .npz file")
    split = None if args.split == "all" else args.split
    w = fit_whitening_file(args.embeddings, args.dim, args.power, args.shrinkage, split,
                           args.batch_size)
    w.save(args.out)
    print(f"fitted PCA-whitening {w.input_dim} -> {w.dim} on {w.n_samples} vectors "
          f"(model {w.model}, power {w.power}, shrinkage {w.shrinkage}; eigenvalues "
          f"{w.eigenvalues[0]:.3g}..{w.eigenvalues[-1]:.3g}) in "
          f"{time.perf_counter() - t0:.1f}s: {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
