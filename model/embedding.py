"""Batch embedding of encoded images: decode, preprocess, forward, L2-normalise.

Plain functions on bytes / numpy / torch, so the Ray Data job (pipelines/embed.py) and the tests
run the same code. ``EmbedBatch`` is the callable class for ``map_batches`` with an actor pool:
it loads the model once per actor.

Rows flow as Arrow tables ("sample tables", ``SAMPLE_COLUMNS``): the manifest labels, the
encoded image bytes, the sha256 of those bytes (``content_hash``) and a ``carry`` flag set for
images an incremental run does not recompute (their bytes are dropped early). ``EmbedBatch``
turns a sample table into an "embedded table" (``embedded_schema``): labels, content_hash,
``embedding`` (null unless embedded), ``error`` (why an image was skipped, else null), carry.

Decoding is ours (not the reader's), so a corrupt image becomes an error row and never stops a
job. GPU: fp16 autocast and channels_last; CPU: fp32. Always under torch.inference_mode.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from contracts.keys import row_keys

SAMPLE_COLUMNS = ("image_id", "item_id", "camera_id", "split", "image", "content_hash", "read_error",
                  "carry")
LABEL_COLUMNS = ("image_id", "item_id", "camera_id", "split")


def content_hash(data: bytes) -> str:
    """sha256 hex digest of the encoded image bytes (what decides 'changed' incrementally)."""
    return hashlib.sha256(data).hexdigest()


def sample_table(rows: Sequence[dict], images: Sequence[bytes],
                 read_errors: Sequence[str | None] | None = None) -> pa.Table:
    """Manifest rows + encoded image bytes -> sample table (content_hash computed, carry False).
    read_errors: per row None or why the image could not be read (it is then not embedded)."""
    return pa.table({
        "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
        "item_id": pa.array([str(r["item_id"]) for r in rows], pa.string()),
        "camera_id": pa.array([r.get("camera_id") for r in rows], pa.int32()),
        "split": pa.array([r.get("split") for r in rows], pa.string()),
        "image": pa.array(list(images), pa.binary()),
        "content_hash": pa.array([content_hash(b) for b in images], pa.string()),
        "read_error": pa.array(read_errors if read_errors is not None else [None] * len(rows), pa.string()),
        "carry": pa.array(np.zeros(len(rows), bool)),
    })


def mark_carried(table: pa.Table, previous_keys: np.ndarray | None) -> pa.Table:
    """Set `carry` on rows whose row key (contracts.keys.row_keys) is in previous_keys (sorted
    (P,) int64) and drop their image bytes, so unchanged images never travel further nor reach the model."""
    if previous_keys is None or len(previous_keys) == 0 or table.num_rows == 0:
        return table
    keys = row_keys(table)
    pos = np.clip(np.searchsorted(previous_keys, keys), 0, len(previous_keys) - 1)
    carry = previous_keys[pos] == keys
    images = table.column("image").to_pylist()
    images = [b"" if c else b for b, c in zip(images, carry)]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    return table.set_column(table.schema.get_field_index("carry"), "carry", pa.array(carry))


# ---- decoding and the forward pass ---------------------------------------------------------

def _model_api():
    """The training helper's model-directory API (imported lazily: torch is heavy)."""
    from model.checkpoint import load_model
    from model.transforms import BatchEvalTransform, decode_image

    return load_model, decode_image, BatchEvalTransform


def decode_or_reason(data: bytes, decode: Callable[[bytes], object]):
    """(PIL image, None) or (None, one-line reason). Never raises for bad bytes."""
    if not data:
        return None, "empty image bytes"
    try:
        img = decode(data)
        return img, None
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a property of this image, not of the job
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"undecodable image: {type(e).__name__}{': ' + msg if msg else ''}"


def decode_resized(images: Sequence[bytes], decode: Callable, transform: Callable,
                   pool: ThreadPoolExecutor | None = None) -> list:
    """Decode and transform each encoded image: a list of N (output, None) or (None, why the
    image is skipped). transform: PIL image -> the per-image output (tensor or uint8 array)."""
    def one(data):
        img, reason = decode_or_reason(data, decode)
        if reason is not None:
            return None, reason
        try:
            return transform(img), None
        except Exception as e:  # noqa: BLE001 -- e.g. a degenerate size the transform rejects
            return None, f"unusable image: {type(e).__name__}: {e}"

    return list(pool.map(one, images)) if pool is not None else [one(b) for b in images]


def preprocess(images: Sequence[bytes], decode: Callable, transform: Callable,
               pool: ThreadPoolExecutor | None = None, collate: Callable | None = None):
    """Decode and transform a batch of encoded images.

    transform: per image (PIL -> tensor, or -> array when `collate` batches them);
    collate: list of per-image outputs -> (n_ok, 3, H, W) tensor (default torch.stack).
    Returns (x, ok, reasons): x float32 tensor (n_ok, 3, H, W) of the decodable images in order,
    ok (N,) bool, reasons: list of N (None or why the image was skipped).
    """
    import torch

    results = decode_resized(images, decode, transform, pool)
    ok = np.array([t is not None for t, _ in results], dtype=bool)
    outs = [t for t, _ in results if t is not None]
    x = (collate or torch.stack)(outs) if outs else None
    return x, ok, [r for _, r in results]


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def prepare_model(net, device: str, input_size: tuple[int, int] | None = None,
                  freeze: bool = True):
    """Move an eval-mode net to `device`. GPU: channels_last (faster convolutions).

    CPU with `input_size` (H, W) and `freeze`: trace and freeze the net for inference (BatchNorm
    folded into the convolutions, oneDNN layouts): about 1.5-2x the eager forward for small
    inputs. The frozen net is checked against the eager one on a test batch; if tracing fails or
    the outputs differ, it says so on stderr and keeps the eager net.
    """
    import torch

    net = net.to(device).eval()
    if device.startswith("cuda"):
        return net.to(memory_format=torch.channels_last)
    if not (freeze and input_size):
        return net
    import sys
    import warnings

    x = torch.randn(3, 3, int(input_size[0]), int(input_size[1]), generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # torch.jit.freeze is marked deprecated in favour of torch.compile, which costs ~40 s
            # of compilation per actor here and was no faster for this model on CPU
            warnings.simplefilter("ignore", FutureWarning)
            # R-MAC's region grid becomes constants of the trace: right, since the trace is
            # made for (and only ever fed) input_size, and checked against the eager net below
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, x[:1])))
            want, got = net(x), frozen(x)
        if torch.allclose(want, got, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
            return frozen
        why = f"outputs differ by {float((want - got).abs().max()):.3g}"
    except Exception as e:  # noqa: BLE001 -- any tracing failure just means the eager path
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"embed: frozen CPU model unusable ({why}); using the eager model", file=sys.stderr)
    return net


def forward_embeddings(net, x, device: str, flip: bool = False) -> np.ndarray:
    """Batched inference: x (B, 3, H, W) float32 -> (B, D) float32 L2-normalised numpy.
    GPU: fp16 autocast + channels_last input; CPU: fp32.

    flip (test-time flip, the model config's `flip_test`): the embedding is the mean of the
    net's outputs for x and for x mirrored left-right (x.flip(-1)), then L2-normalised.
    """
    import torch

    def run(batch):
        if device.startswith("cuda"):
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                return net(batch).float()
        return net(batch.to(device)).float()

    with torch.inference_mode():
        y = run(x)
        if flip:
            y = (y + run(x.flip(-1))) * 0.5
        y = torch.nn.functional.normalize(y, dim=1)  # normalise in fp32
        return y.cpu().numpy().astype(np.float32, copy=False)


@dataclass
class EmbedResult:
    """embeddings: (N, D) float32 (zero rows where not ok); ok: (N,) bool; reasons: N of None|str."""

    embeddings: np.ndarray
    ok: np.ndarray
    reasons: list


class ModelRunner:
    """A loaded model plus its eval transform; embeds lists of encoded images.

    flip: test-time flip, from the model config's `flip_test` (off for a bare runner)."""

    flip = False

    def __init__(self, model_dir: str, device: str = "auto", threads: int | None = None,
                 decode_threads: int = 1, freeze: bool = True):
        import torch

        load_model, self.decode, batch_transform = _model_api()
        if threads:
            torch.set_num_threads(int(threads))
        self.device = pick_device(device)
        net, self.cfg, self.model_id = load_model(model_dir)
        self.flip = bool(self.cfg.flip_test)
        self.net = prepare_model(net, self.device, tuple(self.cfg.input_size), freeze)
        tf = batch_transform(self.cfg)
        self.transform, self.collate = tf.resize, tf.normalize
        self.dim = int(self.cfg.embedding_dim)
        # decoding a small JPEG holds the GIL most of the time: threads only pay for big images
        self.pool = ThreadPoolExecutor(max(1, decode_threads)) if decode_threads > 1 else None

    def embed_images(self, images: Sequence[bytes]) -> EmbedResult:
        """N encoded images -> EmbedResult (undecodable ones not ok, with their reason)."""
        x, ok, reasons = preprocess(images, self.decode, self.transform, self.pool, self.collate)
        return self._embed(x, ok, reasons)

    def embed_pixels(self, arrays: Sequence[np.ndarray]) -> EmbedResult:
        """N decoded, resized images ((H, W, 3) uint8, H, W = the config's input_size, as
        `decode_samples` makes them) -> EmbedResult: only normalise + forward."""
        h, w = (int(v) for v in self.cfg.input_size)
        for a in arrays:
            if a.shape != (h, w, 3):  # pixels made for another model: never embed them
                raise ValueError(f"decoded image of shape {a.shape}, the model wants ({h}, {w}, 3)")
        x = self.collate(list(arrays)) if len(arrays) else None
        return self._embed(x, np.ones(len(arrays), bool), [None] * len(arrays))

    def _embed(self, x, ok: np.ndarray, reasons: list) -> EmbedResult:
        out = np.zeros((len(ok), self.dim), np.float32)
        if x is not None:
            emb = forward_embeddings(self.net, x, self.device, flip=self.flip)
            bad = ~np.isfinite(emb).all(axis=1)
            out[ok] = emb
            if bad.any():  # a NaN embedding is an error of that image, never written
                idx = np.flatnonzero(ok)[bad]
                ok[idx] = False
                for i in idx:
                    reasons[i] = "model produced NaN/inf embedding"
                out[idx] = 0
        return EmbedResult(out, ok, reasons)


def embedded_schema(dim: int) -> pa.Schema:
    """EmbedBatch output: labels, content_hash, embedding (null unless embedded), error, carry."""
    return pa.schema([
        pa.field("image_id", pa.string()), pa.field("item_id", pa.string()),
        pa.field("camera_id", pa.int32()), pa.field("split", pa.string()),
        pa.field("content_hash", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
        pa.field("error", pa.string()), pa.field("carry", pa.bool_()),
        # wall-clock span (epoch seconds) of the model call that handled the row: lets the job
        # tell model time from the time the actors waited for input
        pa.field("started", pa.float64()), pa.field("finished", pa.float64()),
    ])


def embed_sample_table(runner: ModelRunner, table: pa.Table) -> pa.Table:
    """Sample table -> embedded table. Carried rows pass through without a forward pass. A
    table with a `pixels` column (decode_samples) is only normalised and run through the net."""
    import time

    started = time.time()
    carry = table.column("carry").to_numpy(zero_copy_only=False).astype(bool)
    read_errors = table.column("read_error").to_pylist()
    failed = np.array([e is not None for e in read_errors], dtype=bool)
    todo = np.flatnonzero(~carry & ~failed)
    n = table.num_rows
    emb = np.zeros((n, runner.dim), np.float32)
    valid = np.zeros(n, bool)
    errors: list = list(read_errors)
    if len(todo):
        if "pixels" in table.column_names:  # decoded by the reading tasks (decode_samples)
            h, w = (int(v) for v in runner.cfg.input_size)
            pixels = table.column("pixels").take(pa.array(todo)).to_pylist()
            if any(len(b) != h * w * 3 for b in pixels):  # decoded for another model: never embed
                raise ValueError(f"decoded images are not {h}x{w}x3 uint8, the model's input size")
            res = runner.embed_pixels([np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in pixels])
        else:
            res = runner.embed_images(table.column("image").take(pa.array(todo)).to_pylist())
        emb[todo] = res.embeddings
        valid[todo] = res.ok
        for i, r in zip(todo, res.reasons):
            errors[i] = r
    flat = pa.array(emb.reshape(-1))
    embedding = pa.FixedSizeListArray.from_arrays(flat, runner.dim, mask=pa.array(~valid))
    finished = time.time()
    cols = [table.column(c) for c in LABEL_COLUMNS] + [
        table.column("content_hash"), embedding, pa.array(errors, pa.string()), pa.array(carry),
        pa.array(np.full(n, started)), pa.array(np.full(n, finished))]
    return pa.Table.from_arrays(cols, schema=embedded_schema(runner.dim))


class EmbedBatch:
    """Callable for ``ray.data.Dataset.map_batches(EmbedBatch, compute=ActorPoolStrategy(...),
    batch_format="pyarrow")``: loads the model once per actor, then embeds sample tables."""

    def __init__(self, model_dir: str, device: str = "auto", threads: int | None = None,
                 decode_threads: int = 1, freeze: bool = True):
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            # Ray gave this actor a GPU (num_gpus=1) but the node has no CUDA device for it
            import socket

            raise RuntimeError(f"no CUDA device in this GPU actor on {socket.gethostname()} "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        self.runner = ModelRunner(model_dir, device, threads, decode_threads, freeze)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_sample_table(self.runner, batch)


# ---- readers for the two input kinds (no Ray here) -------------------------------------------

def samples_from_shards(urls: Iterable[str], split: str | None = None,
                        chunk: int = 256) -> Iterable[pa.Table]:
    """Stream sample tables (<= `chunk` rows) from WebDataset shards via model.shards.

    An unreadable/truncated shard becomes one error row (image_id = the shard url, empty
    bytes, so it is reported with its reason) after the shard's complete samples. A sample
    whose JSON is bad or breaks the manifest row contract becomes an error row of its own
    (image_id from the row, else from the key): corrupt input is never fatal."""
    from model.shards import iter_shard_samples

    bad: list[tuple[str, str]] = []
    rows, images = [], []

    def on_error(url, exc):
        bad.append((url, f"unreadable shard: {type(exc).__name__}: {exc}"))

    def on_bad_sample(url, image_id, reason):
        bad.append((image_id, f"{reason} (in {url})"))

    for _key, data, _ext, row in iter_shard_samples(list(urls), on_error=on_error,
                                                    on_bad_sample=on_bad_sample):
        if split is not None and row.get("split") != split:
            continue
        rows.append(row)
        images.append(data)
        if len(rows) >= chunk:
            yield sample_table(rows, images)
            rows, images = [], []
    if rows:
        yield sample_table(rows, images)
    if bad:
        yield shard_error_table(bad)


def shard_error_table(bad: Sequence[tuple[str, str]]) -> pa.Table:
    """Error rows (image_id = the shard url or the bad sample's id, read_error = why)."""
    return sample_table([{"image_id": u, "item_id": "", "camera_id": None, "split": None} for u, _ in bad],
                        [b""] * len(bad), [r for _, r in bad])


def read_file_bytes(root: str, rel: str) -> tuple[bytes, str | None]:
    """(bytes of root/rel, None) on the local filesystem or any filesystem pyarrow opens, or
    (b'', reason) if unreadable: the image is then recorded as an error, not fatal."""
    from model.ingest import PathEscapeError, safe_relpath

    try:
        if "://" in root:  # remote roots have no symlinks: the lexical check is enough
            norm = posixpath.normpath(rel)
            if rel.startswith("/") or norm == ".." or norm.startswith("../"):
                raise PathEscapeError(f"manifest path {rel!r} leaves the dataset root")
            rel = norm
        else:
            rel = safe_relpath(root, rel)
    except PathEscapeError as e:
        return b"", str(e)
    path = root.rstrip("/") + "/" + rel
    try:
        if "://" in root and not root.startswith("file://"):
            import pyarrow.fs as pafs

            fs, p = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(p) as f:
                return f.read(), None
        with open(path.removeprefix("file://"), "rb") as f:
            return f.read(), None
    except OSError as e:
        return b"", f"unreadable file: {type(e).__name__}: {e.strerror or e}"


def manifest_sample_table(rows: Sequence[dict], root: str) -> pa.Table:
    """Manifest rows (dicts with image_id, item_id, camera_id, split, path) -> sample table."""
    read = [read_file_bytes(root, r["path"]) for r in rows]
    return sample_table(rows, [b for b, _ in read], [e for _, e in read])


def default_threads() -> int:
    return max(1, (os.cpu_count() or 1))


def decode_samples(table: pa.Table, input_size: tuple[int, int], threads: int = 1) -> pa.Table:
    """Sample table -> the same rows decoded and resized for a model of `input_size` (H, W):
    a `pixels` column (binary, the H*W*3 uint8 bytes of each image to embed; empty for carried
    and failed rows) takes the place of the encoded bytes, which are dropped. An undecodable
    image gets its one-line reason in read_error (the reason the model actor would give).

    The embed job runs this in its reading tasks, so decoding overlaps the forward pass on
    other CPUs and the model actors only normalise and run the net (embed_sample_table)."""
    from model.transforms import decode_image, resize_uint8

    carry = table.column("carry").to_numpy(zero_copy_only=False).astype(bool)
    read_errors = table.column("read_error").to_pylist()
    todo = [i for i in range(table.num_rows) if not carry[i] and read_errors[i] is None]
    images = table.column("image").take(pa.array(todo, pa.int64())).to_pylist() if todo else []
    pool = ThreadPoolExecutor(threads) if threads > 1 and len(images) > 1 else None
    try:
        results = decode_resized(images, decode_image, lambda img: resize_uint8(img, input_size), pool)
    finally:
        if pool is not None:
            pool.shutdown()
    pixels: list = [b""] * table.num_rows
    for i, (arr, reason) in zip(todo, results):
        if arr is None:
            read_errors[i] = reason
        else:
            pixels[i] = arr.tobytes()
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array([b""] * table.num_rows, pa.binary()))
    table = table.set_column(table.schema.get_field_index("read_error"), "read_error",
                             pa.array(read_errors, pa.string()))
    return table.append_column("pixels", pa.array(pixels, pa.binary()))


# ---- Ray Data stage functions (plain functions of Arrow tables; Ray only calls them) ----------

def shard_batch_to_samples(batch: pa.Table, split: str | None = None,
                           previous_keys: np.ndarray | None = None, chunk: int = 256,
                           input_size: tuple[int, int] | None = None, decode_threads: int = 1):
    """map_batches over a table of shard urls (column `url`) -> sample tables of <= `chunk` rows,
    unchanged images marked carried (see mark_carried); with `input_size`, decoded for the
    model there (decode_samples)."""
    for t in samples_from_shards(batch.column("url").to_pylist(), split=split, chunk=chunk):
        t = mark_carried(t, previous_keys)
        yield decode_samples(t, input_size, decode_threads) if input_size else t


def manifest_batch_to_samples(batch: pa.Table, root: str,
                              previous_keys: np.ndarray | None = None,
                              input_size: tuple[int, int] | None = None,
                              decode_threads: int = 1) -> pa.Table:
    """map_batches over manifest rows -> sample table (images read from root/path); with
    `input_size`, decoded for the model there (decode_samples)."""
    rows = batch.select(["image_id", "item_id", "camera_id", "split", "path"]).to_pylist()
    t = mark_carried(manifest_sample_table(rows, root), previous_keys)
    return decode_samples(t, input_size, decode_threads) if input_size else t


def model_time_span(table: pa.Table) -> tuple[float, float, float]:
    """(first start, last finish, busy seconds) of the model calls in an embedded table
    (busy = the sum of distinct calls' durations)."""
    if table.num_rows == 0:
        return float("inf"), float("-inf"), 0.0
    s = table.column("started").to_numpy()
    f = table.column("finished").to_numpy()
    calls = np.unique(np.stack([s, f], 1), axis=0)
    return float(s.min()), float(f.max()), float((calls[:, 1] - calls[:, 0]).sum())


def split_embedded(table: pa.Table) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """Embedded table -> (embedded rows (LABEL_COLUMNS, content_hash, embedding), error rows
    (image_id, reason), (C,) int64 row_keys of carried rows)."""
    import pyarrow.compute as pc

    carry = table.column("carry")
    err = pc.is_valid(table.column("error"))
    ok = pc.and_(pc.is_valid(table.column("embedding")), pc.invert(carry))
    good = table.filter(ok).select([*LABEL_COLUMNS, "content_hash", "embedding"])
    errors = table.filter(err).select(["image_id", "error"]).rename_columns(["image_id", "reason"])
    carried = table.filter(carry)
    return good, errors, row_keys(carried) if carried.num_rows else np.empty(0, np.int64)


# ---- what the embed job needs besides Ray (plain functions, fast to test) ----------------------

@dataclass
class EmbedInputs:
    """What an embed run reads: shard urls (shards mode) or manifest rows (manifest mode)."""

    urls: list[str] | None
    manifest: pa.Table | None
    what: str  # for the progress line, e.g. "3 shard(s)"


def embed_inputs(shards: str | None = None, manifest: str | None = None, root: str | None = None,
                 split: str | None = None) -> EmbedInputs:
    """Resolve the job's input: a shards glob/folder, or a manifest + its dataset root, keeping
    rows of `split` (None: all). Raises FileNotFoundError / ValueError with a one-line reason
    (no shard matches, --root not a directory, no manifest row of that split)."""
    if (shards is None) == (manifest is None):
        raise ValueError("give exactly one of --shards and --manifest")
    if shards is not None:
        from model.shards import list_shards

        urls = list_shards(shards, split=split)
        if not urls:
            raise FileNotFoundError(f"no shards match {shards}" + (f" for split {split}" if split else ""))
        return EmbedInputs(urls, None, f"{len(urls)} shard(s)")
    import pyarrow.compute as pc

    from contracts.manifest import read_manifest

    if not root:
        raise ValueError("--manifest needs --root (the folder the manifest paths are relative to)")
    if "://" not in root and not os.path.isdir(root):
        raise FileNotFoundError(f"--root is not a directory: {root}")
    table = read_manifest(manifest)
    if split:
        table = table.filter(pc.equal(table.column("split"), split))
    if table.num_rows == 0:
        raise ValueError(f"{manifest}: no rows" + (f" of split {split}" if split else ""))
    return EmbedInputs(None, table, f"{table.num_rows} manifest row(s)")


class EmbedClock:
    """Times one embed run from embedded tables: when the first batch came back (Ray start-up
    and model loading), and the span and busy time of the model calls, for the steady rate
    (embedded images over first model call's start .. last one's end)."""

    def __init__(self, clock: Callable[[], float] | None = None):
        import time

        self.clock = clock or time.perf_counter
        self.t0 = self.last = self.clock()
        self.first_out: float | None = None
        self.span = [float("inf"), float("-inf"), 0.0]  # first start, last finish, busy seconds

    def batch(self, table: pa.Table) -> bool:
        """Record one embedded table; True when a progress line is due (every 10 s)."""
        import pyarrow.compute as pc

        s0, s1, busy = model_time_span(table.filter(pc.invert(table.column("carry"))))
        self.span = [min(self.span[0], s0), max(self.span[1], s1), self.span[2] + busy]
        now = self.clock()
        if self.first_out is None:
            self.first_out = now
        if now - self.last > 10:
            self.last = now
            return True
        return False

    def seconds(self) -> float:
        return self.clock() - self.t0

    def summary(self, embedded: int) -> dict:
        """The timing fields of _embed.json."""
        s0, s1, busy = self.span
        steady = embedded / (s1 - s0) if embedded and s1 > s0 else None
        return {"seconds": round(self.seconds(), 3),
                "first_batch_seconds": round(self.first_out - self.t0, 3) if self.first_out else None,
                "steady_images_per_second": round(steady, 2) if steady else None,
                "model_busy_fraction": round(busy / (s1 - s0), 3) if steady else None}
