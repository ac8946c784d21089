"""Embed a gallery with Ray Data: shards (or manifest + images) -> embeddings Parquet.

    python pipelines/embed.py --model MODEL_DIR --shards 'out/shards/gallery-*.tar' --out out/emb
    python pipelines/embed.py --model MODEL_DIR --manifest out/manifest.parquet --root DATA --out out/emb

Reading tasks stream the shards (model.shards reader) or the manifest's files and hash each
image's bytes; an actor pool (one actor per GPU with fp16 + channels_last, CPU actors
otherwise) loads the model once per actor and decodes, preprocesses and embeds batches
(model.embedding). Our own decoding turns a corrupt image into a row of OUT/_errors.parquet
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

import argparse
import json
import os
import time

from cluster.errors import is_lost_on_ray
from pipelines._cli import add_ray_arguments, init_ray, run_main


class _Parser(argparse.ArgumentParser):
    """Bad arguments become a one-line `error: ...` with exit 2 (via run_main)."""

    def error(self, message):
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                   help="image decode threads per actor (more pays only for large images)")
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


def _wait_for_gpus(ray, timeout: float) -> int:
    """Wait until the cluster has a GPU (an autoscaler adding a GPU node); returns the count.

    Asks for one GPU through a pending resource request (what the autoscaler scales on) and
    prints a progress line every 10 s; raises RuntimeError in one line after `timeout` s.
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}])
    t0 = last = time.monotonic()
    while True:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            print(f"embed: {gpus} GPU(s) joined after {time.monotonic() - t0:.0f}s", flush=True)
            return gpus
        now = time.monotonic()
        if now - t0 > timeout:
            raise RuntimeError(f"--device cuda: no GPU joined the Ray cluster within {timeout:.0f}s "
                               "(--gpu-wait)")
        if now - last >= 10:
            last = now
            print(f"embed: waiting for a GPU node ({now - t0:.0f}s of {timeout:.0f}s)", flush=True)
        time.sleep(1)


def cpu_actor_share(cpus: int, actors: int, threads: int) -> float:
    """CPUs each CPU model actor asks Ray for: at most `threads`, leaving a CPU of the cluster's
    `cpus` to the reading tasks, which ask for min(1, this). Across several nodes the spare must
    not be split into fragments no reading task fits (2 nodes of 1 CPU with two 0.5-CPU actors
    and 1-CPU reads, or 8-CPU nodes with 3.75-CPU actors: the job waited forever), so a share of
    one CPU or more is whole (free CPUs per node stay whole) and a smaller one is also the
    reading tasks' size (a node's remainder after its actors still fits one)."""
    share = min(threads, (cpus - 1) / actors)
    return float(int(share)) if share >= 1 else max(0.25, share)


def _previous_keys(prev: str, model_id: str):
    """Sorted (P,) int64 row keys of an earlier output made by the same model (else empty)."""
    import numpy as np

    from contracts.vectors import check_files_agree, check_schema, open_dataset
    from model.embedding import LABEL_COLUMNS, row_keys

    ds = open_dataset(prev)
    meta = check_schema(ds.schema, "embeddings", prev)
    check_files_agree(ds, prev)
    if meta.model != model_id:
        print(f"embed: --incremental {prev} was made by model {meta.model}, not {model_id}: "
              "nothing carried", flush=True)
        return np.empty(0, np.int64)
    if "content_hash" not in ds.schema.names:
        print(f"embed: --incremental {prev} has no content_hash column: nothing carried", flush=True)
        return np.empty(0, np.int64)
    keys = [row_keys(b) for b in ds.to_batches(columns=[*LABEL_COLUMNS, "content_hash"]) if b.num_rows]
    return np.sort(np.concatenate(keys)) if keys else np.empty(0, np.int64)


def _copy_carried(prev: str, carried, write) -> int:
    """Stream the previous output and write its rows whose key is in `carried` (sorted int64);
    write(table) returns the rows it wrote."""
    import numpy as np

    from contracts.vectors import open_dataset
    from model.embedding import row_keys

    n = 0
    if len(carried) == 0:
        return 0
    for b in open_dataset(prev).to_batches(batch_size=8192):
        keys = row_keys(b)
        pos = np.clip(np.searchsorted(carried, keys), 0, len(carried) - 1)
        keep = carried[pos] == keys
        if keep.any():
            import pyarrow as pa

            n += write(pa.Table.from_batches([b]).filter(pa.array(keep)))  # rows written
    return n


class _PartWriter:
    """Rows of the output schema -> part-NNNNN.parquet files of <= rows_per_file rows."""

    def __init__(self, directory: str, schema, rows_per_file: int):
        self.dir, self.schema, self.limit = directory, schema, rows_per_file
        self.writer, self.parts, self.in_part, self.rows = None, 0, 0, 0

    def write(self, table) -> int:
        """Write `table`'s rows; returns how many were written."""
        import pyarrow.parquet as pq

        table = table.select(self.schema.names).cast(self.schema)
        start = 0
        while start < table.num_rows:
            if self.writer is None or self.in_part >= self.limit:
                self.close()
                self.writer = pq.ParquetWriter(f"{self.dir}/part-{self.parts:05d}.parquet", self.schema)
                self.parts += 1
                self.in_part = 0
            take = min(table.num_rows - start, self.limit - self.in_part)
            self.writer.write_table(table.slice(start, take))
            start += take
            self.in_part += take
            self.rows += take
        return table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None



DUPLICATE_REASON = "duplicate image_id: already embedded from an earlier sample (the input holds it twice)"


class DuplicateFilter:
    """Keeps the first row of each image_id across everything the job writes; a later row with
    the same image_id (two copies of a shard, an overlapping glob) becomes an error row instead.
    Why not refuse the job: the first copy is a correct embedding and the run may have cost
    hours; the duplicates are listed in _errors.parquet and counted in _embed.json, and the
    output keeps the contract (image_id unique) that build_index / query / evaluate check."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, table):
        """table with an image_id column -> (first-seen rows, error rows (image_id, reason))."""
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = []
        for image_id in table.column("image_id").to_pylist():
            keep.append(image_id not in self.seen)
            self.seen.add(image_id)
        mask = pa.array(keep, pa.bool_())
        dups = table.filter(pc.invert(mask)).column("image_id")
        errors = pa.table({"image_id": dups.cast(pa.string()),
                           "reason": pa.array([DUPLICATE_REASON] * len(dups), pa.string())})
        return table.filter(mask), errors


def write_errors(out_dir: str, errors: list, rows_written: int):
    """Write out_dir/_errors.parquet (image_id, reason) and return it; refuse an output with no
    embedded row at all (every image failed), naming the first reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    error_table = (pa.concat_tables(errors) if errors else
                   pa.table({"image_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())}))
    if rows_written == 0:
        first = error_table.column("reason")[0].as_py() if error_table.num_rows else "no images"
        raise ValueError(f"nothing embedded: {error_table.num_rows} error(s), first: {first}")
    pq.write_table(error_table, f"{out_dir}/_errors.parquet")
    return error_table

def main(argv=None) -> int:
    try:
        return embed(argv)
    except Exception as e:
        if is_lost_on_ray(e):  # one line, not Ray's traceback; nothing was published
            raise RuntimeError(f"work lost with a Ray node and not recovered ({type(e).__name__}); "
                               "nothing written to --out; re-run the same command") from e
        raise


def embed(argv=None) -> int:
    """The job: parse `argv`, embed, publish --out (see the module docstring)."""
    args = build_parser().parse_args(argv)
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

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
    if args.manifest and not args.root:
        raise ValueError("--manifest needs --root (the folder the manifest paths are relative to)")
    for name in ("batch_size", "rows_per_file", "decode_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    _net, cfg, model_id = load_model(args.model)  # validates the model before any work
    del _net
    dim = int(cfg.embedding_dim)
    schema = embeddings_schema(dim, model_id).append(pa.field("content_hash", pa.string()))

    if args.shards:
        from model.shards import list_shards

        urls = list_shards(args.shards, split=args.split)
        if not urls:
            raise FileNotFoundError(f"no shards match {args.shards}" + (f" for split {args.split}" if args.split else ""))
        what = f"{len(urls)} shard(s)"
    else:
        from contracts.manifest import read_manifest

        if "://" not in args.root and not os.path.isdir(args.root):
            raise FileNotFoundError(f"--root is not a directory: {args.root}")
        manifest = read_manifest(args.manifest)
        if args.split:
            manifest = manifest.filter(pc.equal(manifest.column("split"), args.split))
        if manifest.num_rows == 0:
            raise ValueError(f"{args.manifest}: no rows" + (f" of split {args.split}" if args.split else ""))
        what = f"{manifest.num_rows} manifest row(s)"
    prev_keys = _previous_keys(args.incremental, model_id) if args.incremental else None

    init_ray(args.address, args.num_cpus)
    import ray
    import ray.data

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    use_gpu = args.device == "cuda" or (args.device == "auto" and gpus > 0)
    if args.device == "auto" and not gpus:
        print("embed: --device auto: no GPU in the Ray cluster now, embedding on CPU "
              "(--device cuda waits for a GPU node the autoscaler adds)", flush=True)
    if use_gpu and gpus == 0:
        gpus = _wait_for_gpus(ray, args.gpu_wait)
    actors = args.actors or (gpus if use_gpu else max(1, cpus // 4))
    threads = args.threads or max(1, cpus // actors)
    actor_res = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": cpu_actor_share(cpus, actors, threads)}
    print(f"embed: model {model_id} (dim {dim}), {what}, {actors} {'GPU' if use_gpu else 'CPU'} actor(s), "
          f"{threads} thread(s), batch {args.batch_size}"
          + (f", {len(prev_keys)} previous rows to compare" if prev_keys is not None else ""), flush=True)

    # Reading runs in its own tasks, overlapped with the model: remote args that differ from the
    # actors' (a retry count for flaky storage) keep Ray from fusing this stage into the model
    # actors, where it would run in series with the forward pass.
    read_args = {"num_cpus": min(1.0, actor_res["num_cpus"]), "max_retries": 3}
    if args.shards:
        ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
        ds = ds.map_batches(E.shard_batch_to_samples, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"split": args.split, "previous_keys": prev_keys,
                                       "chunk": max(args.batch_size, 64)}, **read_args)
    else:
        blocks = max(1, min(manifest.num_rows // 256, 10_000))
        ds = ray.data.from_arrow(manifest).repartition(blocks)
        ds = ds.map_batches(E.manifest_batch_to_samples, batch_size=256, batch_format="pyarrow",
                            fn_kwargs={"root": args.root, "previous_keys": prev_keys}, **read_args)
    ds = ds.map_batches(
        E.EmbedBatch, batch_size=args.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model_dir": args.model, "device": "cuda" if use_gpu else "cpu",
                               "threads": None if use_gpu else threads,
                               "decode_threads": args.decode_threads,
                               "freeze": not args.no_freeze},
        **actor_res)

    t0 = time.perf_counter()
    errors: list = []
    carried: list = []
    embedded = 0
    last = t0
    first_out = None  # when the first batch came back: after Ray start-up and model loading
    span = [float("inf"), float("-inf"), 0.0]  # model calls: first start, last finish, busy seconds
    with atomic_dir(args.out) as tmp:
        writer = _PartWriter(tmp, schema, args.rows_per_file)
        first_copy = DuplicateFilter()

        def write_once(table):
            table, dups = first_copy(table)
            if dups.num_rows:
                errors.append(dups)
            writer.write(table)
            return table.num_rows

        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                good, errs, keys = E.split_embedded(batch)
                s0, s1, busy = E.model_time_span(batch.filter(pc.invert(batch.column("carry"))))
                span = [min(span[0], s0), max(span[1], s1), span[2] + busy]
                if first_out is None:
                    first_out = time.perf_counter()
                if good.num_rows:
                    embedded += write_once(good)
                if errs.num_rows:
                    errors.append(errs)
                carried.append(keys)
                now = time.perf_counter()
                if now - last > 10:
                    last = now
                    print(f"embed: {embedded} embedded ({embedded / (now - t0):.1f} img/s), "
                          f"{sum(len(k) for k in carried)} unchanged, "
                          f"{sum(e.num_rows for e in errors)} error(s)", flush=True)
            carried_keys = np.unique(np.concatenate(carried)) if carried else np.empty(0, np.int64)
            n_carried = _copy_carried(args.incremental, carried_keys, write_once) if args.incremental else 0
        finally:
            writer.close()
        error_table = write_errors(tmp, errors, writer.rows)
        seconds = time.perf_counter() - t0
        # steady rate: embedded images over the span from the first model call's start to the last
        # one's end (model loading and Ray start-up excluded, reading stalls included)
        steady = embedded / (span[1] - span[0]) if embedded and span[1] > span[0] else None
        summary = {"model": model_id, "dim": dim, "embedded": embedded, "carried": n_carried,
                   "errors": error_table.num_rows, "rows": writer.rows, "files": writer.parts,
                   "seconds": round(seconds, 3),
                   "first_batch_seconds": round(first_out - t0, 3) if first_out else None,
                   "steady_images_per_second": round(steady, 2) if steady else None,
                   "model_busy_fraction": round(span[2] / (span[1] - span[0]), 3) if steady else None}
        with open(f"{tmp}/_embed.json", "w") as f:
            json.dump(summary, f, indent=2)
    print(f"embed: {embedded} embedded, {n_carried} carried over unchanged, {error_table.num_rows} error(s) "
          f"in {seconds:.1f}s ({embedded / max(seconds, 1e-9):.1f} img/s) -> {args.out}", flush=True)
    for image_id, reason in list(zip(error_table.column("image_id").to_pylist(),
                                     error_table.column("reason").to_pylist()))[:5]:
        print(f"embed: skipped {image_id}: {reason}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
