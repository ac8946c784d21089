"""Nightly re-index: embed new/changed gallery images, update centroids, build, gate, publish.

    python pipelines/reindex.py --gallery-manifest data/manifest.parquet --root data \\
        --model models/ctl --work outputs/reindex --index-root outputs/indexes --name gallery \\
        --validation outputs/query_emb

Steps (index/nightly/runner.py; every step is logged to WORK/reindex.jsonl with counts and seconds):
  embed      only images whose id, bytes (sha256), labels or model changed go through the model
             (pipelines/embed.py --incremental on Ray, or in this process with --executor local);
             images no longer in the manifest are dropped; a model change re-embeds everything
  centroids  per-(item, camera) sums kept in WORK: only the touched items are recomputed
  build      a new index version under INDEX_ROOT/NAME (not yet published)
  gate       the validation queries (query embeddings from the same model) are searched against
             the new and the published version with the same k: publish only if mAP@k over all
             validation queries (one that lost its matches scores 0) drops by at most --max-drop,
             the gallery lost at most --max-shrink of its vectors and the new version's recall
             reaches --target-recall; otherwise the published version stays, and the job exits
             2 with the reason
  publish    CURRENT replaced atomically, old versions pruned (--keep)
Nothing changed since the last published run: no new version, exit 0.
A second run while one is going exits 2 ("another reindex run holds the lock"). A run killed at
any point can simply be run again.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import argparse
import os

from pipelines._cli import add_ray_arguments, init_ray, make_parser, run_main

KILL_ENV = "CR_REINDEX_KILL_AFTER"  # crash tests: SIGKILL this process after the named step


def build_parser() -> argparse.ArgumentParser:
    from dataclasses import fields

    from index.nightly.runner import INDEX_KINDS, ReindexConfig

    d = {f.name: f.default for f in fields(ReindexConfig)}  # the defaults live in the config
    p = make_parser(__doc__)
    p.add_argument("--gallery-manifest", required=True,
                   help="manifest Parquet of the gallery (rows of --split are used)")
    p.add_argument("--root", default=None,
                   help="dataset root the manifest paths are relative to (default: the manifest's folder)")
    p.add_argument("--split", default="gallery", help="manifest split to index (default gallery)")
    p.add_argument("--model", required=True, help="model directory (model.pt + config.json)")
    p.add_argument("--work", required=True,
                   help="work directory: embeddings, per-item sums, state, run log (reindex.jsonl)")
    p.add_argument("--index-root", required=True, help="index root (versions under ROOT/NAME)")
    p.add_argument("--name", required=True, help="index name")
    p.add_argument("--validation", required=True,
                   help="validation query embeddings (Parquet, same model as --model)")
    p.add_argument("--published-validation", default=None,
                   help="query embeddings made with the published version's model, for the gate "
                        "after a model change (default: its recorded validation mAP)")
    p.add_argument("--max-drop", type=float, default=d["max_drop"],
                   help="largest allowed validation mAP drop vs the published version (default %(default)s)")
    p.add_argument("--target-recall", type=float, default=d["target_recall"],
                   help="recall@10 the new index must reach vs exact search (default %(default)s)")
    p.add_argument("--keep", type=int, default=d["keep"], help="index versions to keep (default %(default)s)")
    p.add_argument("--shards", type=int, default=d["shards"],
                   help="index shards (default: as the published version, 1 if none)")
    p.add_argument("--index-type", default=d["index_type"],
                   help="auto, flat, hnsw, ivf, ivfpq or a FAISS factory string (default %(default)s)")
    p.add_argument("--rerank-graph", type=int, default=d["rerank_graph"], metavar="K",
                   help="store every vector's K nearest neighbours with each version, for query.py "
                        "--rerank kreciprocal (see build_index.py; default 0: none)")
    p.add_argument("--index-kind", default=d["index_kind"], choices=list(INDEX_KINDS),
                   help="index one centroid per item or every image embedding (default: as the "
                        "published version, centroids if none)")
    p.add_argument("--max-error-fraction", type=float, default=d["max_error_fraction"],
                   help="refuse the run when more than this fraction of the gallery images cannot be "
                        "read or decoded (default %(default)s)")
    p.add_argument("--gate-k", type=int, default=d["gate_k"],
                   help="ranked list length for the gate's mAP@k (default %(default)s)")
    p.add_argument("--max-shrink", type=float, default=d["max_shrink"],
                   help="refuse a version with more than this fraction fewer vectors than the published "
                        "one (default %(default)s; 1.0 allows any shrink)")
    p.add_argument("--executor", default="ray", choices=["ray", "local"],
                   help="ray: embed with Ray Data (pipelines/embed.py); local: embed in this process "
                        "(small galleries, tests)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: embed's choice)")
    add_ray_arguments(p)
    return p


def embed_local(manifest, root: str, model_dir: str, previous: str | None, out: str,
                batch_size: int = 64, threads: int | None = None, rows_per_file: int = 200_000) -> dict:
    """Embed a manifest table in this process, in pipelines/embed.py's output layout (part files
    + content_hash, _errors.parquet, _embed.json), carrying over unchanged rows of `previous`
    (same key and model) through contracts.parts.EmbedOutput, as the embed job does. Returns the
    _embed.json summary."""
    import pyarrow as pa

    from contracts.parts import EmbedOutput, previous_keys
    from contracts.storage import atomic_dir
    from contracts.vectors import embeddings_schema
    from model import embedding as E

    clock = E.EmbedClock()
    runner = E.ModelRunner(model_dir, device="auto", threads=threads or None, decode_threads=1)
    prev_keys = previous_keys(previous, runner.model_id) if previous else None
    schema = embeddings_schema(runner.dim, runner.model_id).append(pa.field("content_hash", pa.string()))
    with atomic_dir(out) as tmp:
        output = EmbedOutput(tmp, schema, rows_per_file, runner.model_id, runner.dim)
        try:
            for batch in manifest.to_batches(max_chunksize=batch_size):
                samples = E.manifest_batch_to_samples(pa.Table.from_batches([batch]), root, prev_keys)
                output.add(*E.split_embedded(E.embed_sample_table(runner, samples)))
        except BaseException:
            output.close()
            raise
        summary, _ = output.finish(previous, seconds=round(clock.seconds(), 3))
    return summary


def embed_with_ray(args, previous: str | None, out: str) -> dict:
    """pipelines/embed.py on Ray (the cluster's or an embedded one) -> its _embed.json summary."""
    from pipelines import embed

    argv = ["--model", args.model, "--manifest", args.gallery_manifest, "--root", args.root,
            "--split", args.split, "--out", out, "--batch-size", str(args.batch_size)]
    if previous:
        argv += ["--incremental", previous]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.address:
        argv += ["--address", args.address]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    rc = embed.main(argv)
    if rc:
        raise RuntimeError(f"embed step failed with exit status {rc}")
    from index.nightly.state import read_json

    summary = read_json(os.path.join(out, "_embed.json"))  # size-capped, regular file only
    if summary is None:
        raise RuntimeError(f"embed step wrote no {os.path.join(out, '_embed.json')}")
    return summary


def model_identity(model_dir: str) -> str:
    """The model's id (model.checkpoint.model_id: weights + config), with its config checked,
    without building the network (the embed step loads it)."""
    from model.checkpoint import CONFIG_FILE, MODEL_FILE, read_model_id

    try:
        return read_model_id(model_dir)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"--model {model_dir}: not a model directory ({MODEL_FILE} + {CONFIG_FILE})") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import pyarrow.compute as pc

    from contracts.manifest import read_manifest
    from index.nightly.runner import ReindexConfig, Reindexer

    args.root = args.root or os.path.dirname(os.path.abspath(args.gallery_manifest))
    if "://" not in args.root and not os.path.isdir(args.root):
        raise FileNotFoundError(f"--root is not a directory: {args.root}")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    manifest = read_manifest(args.gallery_manifest)
    manifest = manifest.filter(pc.equal(manifest.column("split"), args.split))
    if manifest.num_rows == 0:
        raise ValueError(f"{args.gallery_manifest}: no rows of split {args.split}")
    model_id = model_identity(args.model)
    cfg = ReindexConfig(
        work=args.work, index_root=args.index_root, name=args.name, validation=args.validation,
        model_id=model_id, published_validation=args.published_validation, max_drop=args.max_drop,
        target_recall=args.target_recall, keep=args.keep, shards=args.shards, index_type=args.index_type,
        index_kind=args.index_kind, gate_k=args.gate_k, max_error_fraction=args.max_error_fraction,
        max_shrink=args.max_shrink, rerank_graph=args.rerank_graph,
        kill_after=os.environ.get(KILL_ENV) or None,
        model_dir=args.model if "://" in args.model else os.path.abspath(args.model))
    print(f"reindex: {manifest.num_rows} {args.split} images in {args.gallery_manifest}, model {model_id}, "
          f"index {os.path.join(args.index_root, args.name)}", flush=True)

    if args.executor == "ray":
        init_ray(args.address, args.num_cpus)

        def embed(previous, out):
            return embed_with_ray(args, previous, out)
    else:
        def embed(previous, out):
            return embed_local(manifest, args.root, args.model, previous, out, args.batch_size,
                               args.threads or None)

    summary = Reindexer(cfg, embed, say=lambda m: print(m, flush=True)).run()
    print(f"reindex: {summary.status}: {summary.embedded} embedded, {summary.carried} carried, "
          f"+{summary.added}/-{summary.removed} rows, {summary.items} items, {summary.images} images, "
          f"published {summary.published} in {summary.seconds:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
