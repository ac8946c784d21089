"""Embed a gallery with Ray Data: shards (or manifest + images) -> embeddings Parquet.

    python pipelines/embed.py --model MODEL_DIR --shards 'out/shards/gallery-*.tar' --out out/emb
    python pipelines/embed.py --model MODEL_DIR --manifest out/manifest.parquet --root DATA --out out/emb

Reading tasks stream the shards (model.shards reader) or the manifest's files, hash each
image's bytes and decode and resize it for the model; an actor pool (one actor per GPU with
fp16 + channels_last, CPU actors otherwise) loads the model once per actor and normalises and
embeds batches (model.embedding), so decoding runs beside the forward pass, not before it. Our own decoding turns a corrupt image into a row of OUT/_errors.parquet
(image_id, reason), never a failed job.

OUT (replaced atomically, only when complete) holds
  part-NNNNN.parquet  the embeddings contract (+ a content_hash column: sha256 of the bytes)
  _errors.parquet     images that could not be embedded (image_id, reason); the leading "_"
                      keeps it out of readers that open OUT as one Parquet dataset
  _embed.json         counts (embedded, carried, errors), model id, seconds
--incremental PREVIOUS_OUT carries over rows whose image id, bytes (content hash), labels and
model are unchanged; only new or changed images go through the model.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import os

from cluster.errors import actor_init_error, is_lost_on_ray
from cluster.gpus import auto_cpu_reason, probe_cuda, wait_for_gpus
from pipelines._cli import Parser, add_ray_arguments, init_ray, make_parser, run_main


def build_parser() -> Parser:
    p = make_parser(__doc__)
    p.add_argument("--model", required=True, help="model directory (model.pt + config.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shards: a glob, a shards folder or a make_shards output folder")
    src.add_argument("--manifest", help="manifest Parquet; images are read from --root/<path>")
    p.add_argument("--root", help="dataset root for --manifest")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--split", default=None, help="embed only this split (e.g. gallery); default all")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--actors", type=int, default=0,
                   help="model actors (default: one per GPU, else one per 4 CPUs, at least 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per CPU actor (default: CPUs / actors)")
    p.add_argument("--decode-threads", type=int, default=1,
                   help="image decode threads per reading task (more pays only for large images)")
    p.add_argument("--no-freeze", action="store_true",
                   help="CPU: run the eager model instead of the traced, frozen one")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: GPU actors when the cluster has GPUs, else CPU")
    p.add_argument("--gpu-wait", type=float, default=600, metavar="SECONDS",
                   help="--device cuda: wait this long for a GPU node to join (default 600)")
    p.add_argument("--incremental", default=None, metavar="PREVIOUS_OUT",
                   help="carry over unchanged rows of this earlier embed output")
    p.add_argument("--rows-per-file", type=int, default=200_000, help="rows per output part file")
    add_ray_arguments(p)
    return p


def plan_actors(resources: dict, device: str, actors: int, threads: int) -> tuple[bool, int, int, dict]:
    """(use GPU, actors, torch threads per actor, Ray resources per actor) for a cluster's
    resources and the --device / --actors / --threads options."""
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:  # main waits for a GPU node first (wait_for_gpus)
        raise RuntimeError("--device cuda but the Ray cluster has no GPU")
    actors = actors or (gpus if use_gpu else max(1, cpus // 4))
    threads = threads or max(1, cpus // actors)
    if use_gpu:
        return True, actors, threads, {"num_gpus": 1, "num_cpus": 1}
    return False, actors, threads, {"num_cpus": cpu_actor_share(cpus, actors, threads)}


def cpu_actor_share(cpus: int, actors: int, threads: int) -> float:
    """CPUs each CPU model actor asks Ray for: at most `threads`, leaving a CPU of the cluster's
    `cpus` to the reading tasks, which ask for min(1, this). Across several nodes the spare must
    not be split into fragments no reading task fits (2 nodes of 1 CPU with two 0.5-CPU actors
    and 1-CPU reads, or 8-CPU nodes with 3.75-CPU actors: the job waited forever), so a share of
    one CPU or more is whole (free CPUs per node stay whole) and a smaller one is also the
    reading tasks' size (a node's remainder after its actors still fits one)."""
    share = min(threads, (cpus - 1) / actors)
    return float(int(share)) if share >= 1 else max(0.25, share)


def build_dataset(args, inputs, prev_keys, use_gpu: bool, actors: int, threads: int, actor_res: dict,
                  input_size: tuple[int, int]):
    """The Ray Data pipeline: reading + decoding tasks -> model actor pool -> embedded tables.
    input_size: the model's (H, W), what the reading tasks resize to."""
    import ray.data

    from model import embedding as E

    # Reading runs in its own tasks, overlapped with the model: remote args that differ from the
    # actors' (a retry count for flaky storage) keep Ray from fusing this stage into the model
    # actors, where it would run in series with the forward pass.
    read_args = {"num_cpus": min(1.0, actor_res.get("num_cpus", 1.0)), "max_retries": 3}
    # The reading tasks also decode and resize for the model (embedding.decode_samples): that
    # runs beside the forward pass instead of before it, and a GPU actor's one CPU only feeds it.
    decode = {"input_size": tuple(int(v) for v in input_size), "decode_threads": args.decode_threads}
    if inputs.urls is not None:
        ds = ray.data.from_items([{"url": u} for u in inputs.urls], override_num_blocks=len(inputs.urls))
        ds = ds.map_batches(E.shard_batch_to_samples, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"split": args.split, "previous_keys": prev_keys,
                                       "chunk": max(args.batch_size, 64), **decode}, **read_args)
    else:
        blocks = max(1, min(inputs.manifest.num_rows // 256, 10_000))
        ds = ray.data.from_arrow(inputs.manifest).repartition(blocks)
        ds = ds.map_batches(E.manifest_batch_to_samples, batch_size=256, batch_format="pyarrow",
                            fn_kwargs={"root": args.root, "previous_keys": prev_keys, **decode},
                            **read_args)
    return ds.map_batches(
        E.EmbedBatch, batch_size=args.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model_dir": args.model, "device": "cuda" if use_gpu else "cpu",
                               "threads": None if use_gpu else threads,
                               "decode_threads": 1,  # the reading tasks decode
                               "freeze": not args.no_freeze},
        **actor_res)


def say(message: str) -> None:
    print(message, flush=True)


def main(argv=None) -> int:
    try:
        return embed(argv)
    except Exception as e:
        why = actor_init_error(e)
        if why:  # a model actor could not start (no CUDA in a GPU actor, a bad model file)
            raise RuntimeError(f"a model actor failed to start: {why}; nothing written to --out") from e
        if is_lost_on_ray(e):  # one line, not Ray's traceback; nothing was published
            raise RuntimeError(f"work lost with a Ray node and not recovered ({type(e).__name__}); "
                               "nothing written to --out; re-run the same command") from e
        raise


def embed(argv=None) -> int:
    """The job: parse `argv`, embed, publish --out (see the module docstring)."""
    args = build_parser().parse_args(argv)
    import pyarrow as pa

    from contracts.parts import EmbedOutput, previous_keys
    from contracts.storage import atomic_dir, is_uri
    from contracts.vectors import embeddings_schema
    from model import embedding as E
    from model.checkpoint import load_model

    # actors run in other processes (other nodes) with another working directory
    args.model = args.model if is_uri(args.model) else os.path.abspath(args.model)
    if args.shards and not is_uri(args.shards):
        args.shards = os.path.abspath(args.shards)
    if args.root and not is_uri(args.root):
        args.root = os.path.abspath(args.root)
    for name in ("batch_size", "rows_per_file", "decode_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.manifest and not args.root:
        raise ValueError("--manifest needs --root (the folder the manifest paths are relative to)")
    _net, cfg, model_id = load_model(args.model)  # validates the model before any work
    del _net
    dim = int(cfg.embedding_dim)
    inputs = E.embed_inputs(args.shards, args.manifest, args.root, args.split)
    prev_keys = previous_keys(args.incremental, model_id, say) if args.incremental else None

    init_ray(args.address, args.num_cpus)
    import ray

    resources = dict(ray.cluster_resources())
    if args.device == "auto" and not resources.get("GPU"):
        say(auto_cpu_reason("embed", "--device"))
    if args.device == "cuda":
        resources["GPU"] = wait_for_gpus(ray, args.gpu_wait, need=1, job="embed", say=say)
    if args.device == "cuda" or resources.get("GPU"):
        # one GPU task first: a GPU node without CUDA is one line here, not an actor pool
        # that Ray restarts and retries, printing each actor's traceback
        probe_cuda(ray, job="embed")
    use_gpu, actors, threads, actor_res = plan_actors(resources, args.device, args.actors, args.threads)
    say(f"embed: model {model_id} (dim {dim}), {inputs.what}, {actors} {'GPU' if use_gpu else 'CPU'} actor(s), "
        f"{threads} thread(s), batch {args.batch_size}"
        + (f", {len(prev_keys)} previous rows to compare" if prev_keys is not None else ""))
    ds = build_dataset(args, inputs, prev_keys, use_gpu, actors, threads, actor_res, tuple(cfg.input_size))

    clock = E.EmbedClock()
    schema = embeddings_schema(dim, model_id).append(pa.field("content_hash", pa.string()))
    with atomic_dir(args.out) as tmp:
        out = EmbedOutput(tmp, schema, args.rows_per_file, model_id, dim)
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                out.add(*E.split_embedded(batch))
                if clock.batch(batch):
                    say(f"embed: {out.embedded} embedded ({out.embedded / clock.seconds():.1f} img/s), "
                        f"{out.n_unchanged} unchanged, {out.n_errors} error(s)")
        except BaseException:
            out.close()  # atomic_dir removes the temporary output
            raise
        summary, error_table = out.finish(args.incremental, **clock.summary(out.embedded))
    seconds = summary["seconds"]
    say(f"embed: {summary['embedded']} embedded, {summary['carried']} carried over unchanged, "
        f"{summary['errors']} error(s) in {seconds:.1f}s "
        f"({summary['embedded'] / max(seconds, 1e-9):.1f} img/s) -> {args.out}")
    for image_id, reason in list(zip(error_table.column("image_id").to_pylist(),
                                     error_table.column("reason").to_pylist()))[:5]:
        say(f"embed: skipped {image_id}: {reason}")
    return 0


if __name__ == "__main__":
    run_main(main)
