"""Dataset ingest: three adapters that list a dataset as manifest rows, an image checker, and
`build_dataset`, which turns checked rows into WebDataset shards plus manifest/rejected files.

Adapters (each returns a `Scan`: manifest rows and (path, reason) rejections):

- ``scan_market1501(root)``: ``bounding_box_train`` -> train, ``query`` -> query,
  ``bounding_box_test`` -> gallery. Item and camera come from ``PPPP_cC...`` names (also
  ``*.jpg.jpg``, ``-1_c...``). Item ids are the person number as an integer written in decimal,
  so leading zeros go: ``0002`` -> "2", ``0000`` (distractor) -> "0", ``-1`` (junk) -> "-1";
  this keeps the DESIGN conventions ("-1" junk, "0" distractor) and matches the integer pids
  of the usual Market-1501 loaders. Files whose names do not parse are rejected.
- ``scan_folders(root, ...)``: ``ROOT/<item_id>/<image>`` (images may sit in sub-folders of
  the item folder); the item id is the folder name as written; no camera (null). Splits come
  from `assign_splits`.
- ``scan_manifest(root, file, ...)``: a CSV or Parquet file with columns
  ``path,item_id[,camera_id][,split]``; paths are relative to `root`. A row with an absolute
  path, a ``..`` that leaves the root, or a symlink that resolves outside it (`safe_relpath`),
  a bad camera_id or split, or a missing file is rejected with its reason, like a bad file of
  the other adapters; without a split column, `assign_splits` decides.

`assign_splits` (folders, and manifests without a split column) is deterministic: items are
sorted in natural order ("2" < "10"); the first round(train_fraction * n) items are train, the
rest are test items, of which each keeps its first `query_per_item` images (sorted by
image_id) as queries -- at most count - 1 so every query has a gallery match -- and the rest as
gallery. Items "-1" (junk) and "0" (distractors) always go to the gallery.

image_id (and path) is the image's path relative to the dataset root, '/'-separated.

Checking (`check_image`): every image must be non-empty, identified by PIL, within
`max_pixels` (a guard against decompression bombs, applied per call: the PIL global is never
changed), pass ``verify()``, decode fully with ``load()`` and convert to upright 8-bit RGB with
`model.transforms.upright_rgb` (what embed and training decode to; a mode it refuses is a
rejection). JPEG and PNG keep their original bytes (EXIF orientation included); other formats
PIL reads (BMP, GIF, TIFF, WebP, ...) are re-encoded to PNG from that upright RGB image
(lossless for what the model sees) because shards carry only ``jpg``/``png``. With
``resize=(H, W)`` every image is re-encoded from the upright RGB image (JPEG quality 95 for
JPEG input, PNG otherwise), so the orientation is never lost with the EXIF block.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import posixpath
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from contracts.manifest import (
    DISTRACTOR_ITEM,
    JUNK_ITEM,
    SPLITS,
    make_manifest_table,
    make_rejected_table,
    write_manifest,
)
from model.config import MAX_INPUT_SIDE
from model.shards import DEFAULT_SHARD_SIZE, write_shards
from model.transforms import upright_rgb

MARKET_FOLDERS = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}
# PPPP_cC...: person id (or -1), camera number; the rest of the name is free (s, frame, box).
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)")
MARKET_EXTS = (".jpg", ".jpeg", ".png")
DEFAULT_MAX_PIXELS = 40_000_000  # below PIL's own 89M warning limit; ReID crops are tiny
JPEG_QUALITY = 95


class PathEscapeError(ValueError):
    """A manifest path that is absolute or leads outside the dataset root."""


class IngestError(ValueError):
    """Bad ingest input: missing root, unreadable manifest file, no images."""


@dataclass
class Scan:
    """What an adapter found: rows (manifest dicts, no checks yet) and rejected (path, reason)."""

    rows: list[dict] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class CheckConfig:
    """How images are checked and (optionally) re-encoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    resize: tuple[int, int] | None = None  # (H, W)

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        # the same bound as a model's input size: every image is re-encoded at this size
        if self.resize is not None and (len(self.resize) != 2
                                        or not all(1 <= v <= MAX_INPUT_SIDE for v in self.resize)):
            raise ValueError(f"--resize must be HxW with both in [1, {MAX_INPUT_SIDE}], got {self.resize}")


@dataclass(frozen=True)
class CheckedImage:
    """Result of check_image: ok with (data, ext), or not ok with a reason."""

    ok: bool
    data: bytes = b""
    ext: str = ""
    reason: str = ""


@dataclass
class IngestSummary:
    """What build_dataset wrote: images, distinct items and shards per split; rejected count."""

    counts: dict[str, int]
    items: dict[str, int]
    rejected: int
    shards: dict[str, int]


# ---------------------------------------------------------------- adapters

def parse_market_name(name: str) -> tuple[str, int] | None:
    """'0002_c1s1_000451_03.jpg' -> ("2", 1); '-1_c3s2_...' -> ("-1", 3); else None."""
    if not name.lower().endswith(MARKET_EXTS):
        return None
    m = MARKET_NAME.match(name)
    if not m:
        return None
    return str(int(m.group(1))), int(m.group(2))


def _require_dir(root: str) -> str:
    if not os.path.exists(root):
        raise FileNotFoundError(f"dataset root not found: {root}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"dataset root is not a directory: {root}")
    return os.path.realpath(root)


def _inside(real_root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _walk_files(root: str, sub: str, rejected: list[tuple[str, str]]) -> list[str]:
    """Files under root/sub as sorted root-relative '/' paths. Symlinked folders are not
    followed (they could loop or leave the root); they are added to `rejected`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        parts = rel_dir.split(os.sep) if rel_dir != "." else []
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                rejected.append((posixpath.join(*parts, d), "symlinked folder (not followed)"))
        for f in filenames:
            out.append(posixpath.join(*parts, f))
    return sorted(out)


def scan_market1501(root: str) -> Scan:
    """Market-1501 layout -> Scan (see module doc for the naming rules)."""
    real_root = _require_dir(root)
    present = [d for d in MARKET_FOLDERS if os.path.isdir(os.path.join(root, d))]
    if not present:
        raise IngestError(f"{root} has none of the Market-1501 folders "
                          f"{', '.join(MARKET_FOLDERS)}")
    scan = Scan()
    for folder in present:
        for rel in _walk_files(root, folder, scan.rejected):
            if not _inside(real_root, os.path.join(root, rel)):
                scan.rejected.append((rel, "symlink points outside the dataset root"))
                continue
            parsed = parse_market_name(posixpath.basename(rel))
            if parsed is None:
                scan.rejected.append((rel, "name is not a Market-1501 image name (PPPP_cC...jpg)"))
                continue
            item, cam = parsed
            scan.rows.append({"image_id": rel, "item_id": item, "camera_id": cam,
                              "split": MARKET_FOLDERS[folder], "path": rel})
    return scan


def _natural_key(s: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t)


def assign_splits(rows: list[dict], query_per_item: int = 1, train_fraction: float = 0.5
                  ) -> list[dict]:
    """Give every row a split (train/query/gallery) deterministically; see the module doc."""
    if query_per_item < 0:
        raise ValueError(f"--query-per-item must be >= 0, got {query_per_item}")
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"--train-fraction must be in [0, 1], got {train_fraction}")
    by_item: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_item[r["item_id"]].append(r)
    special = {JUNK_ITEM, DISTRACTOR_ITEM}
    items = sorted((i for i in by_item if i not in special), key=_natural_key)
    n_train = round(train_fraction * len(items))
    out = []
    for rank, item in enumerate(items):
        group = sorted(by_item[item], key=lambda r: r["image_id"])
        if rank < n_train:
            out += [{**r, "split": "train"} for r in group]
            continue
        nq = min(query_per_item, len(group) - 1)
        out += [{**r, "split": "query" if k < nq else "gallery"} for k, r in enumerate(group)]
    for item in sorted(special & set(by_item)):
        out += [{**r, "split": "gallery"} for r in by_item[item]]
    return out


def scan_folders(root: str, query_per_item: int = 1, train_fraction: float = 0.5) -> Scan:
    """ROOT/<item_id>/<image> -> Scan, splits by assign_splits, camera_id null."""
    real_root = _require_dir(root)
    scan = Scan()
    rows = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if not _inside(real_root, full):
            scan.rejected.append((name, "symlink points outside the dataset root"))
        elif os.path.isdir(full):
            for rel in _walk_files(root, name, scan.rejected):
                if not _inside(real_root, os.path.join(root, rel)):
                    scan.rejected.append((rel, "symlink points outside the dataset root"))
                else:
                    rows.append({"image_id": rel, "item_id": name, "camera_id": None, "path": rel})
        else:
            scan.rejected.append((name, "not inside an item folder (ROOT/<item_id>/<image>)"))
    scan.rows = assign_splits(rows, query_per_item, train_fraction)
    return scan


def safe_relpath(root: str, path: str) -> str:
    """A manifest path -> normalised root-relative '/' path; PathEscapeError if it escapes."""
    if not isinstance(path, str) or not path.strip():
        raise PathEscapeError(f"empty path in manifest: {path!r}")
    p = path.replace("\\", "/") if os.sep == "\\" else path
    if p.startswith("/") or re.match(r"^[A-Za-z]:[/\\]", p) or os.path.isabs(p):
        raise PathEscapeError(f"manifest path {path!r} is absolute; paths must be relative to --root")
    norm = posixpath.normpath(p)
    if norm == ".." or norm.startswith("../"):
        raise PathEscapeError(f"manifest path {path!r} leaves the dataset root ('..')")
    if norm in (".", ""):
        raise PathEscapeError(f"manifest path {path!r} names the root itself")
    real_root = os.path.realpath(root)
    if not _inside(real_root, os.path.join(root, *norm.split("/"))):
        raise PathEscapeError(f"manifest path {path!r} resolves outside the dataset root (symlink)")
    return norm


def read_manifest_file(file: str):
    """Read a CSV or Parquet ingest manifest -> pa.Table (item_id as string)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not os.path.isfile(file):
        raise FileNotFoundError(f"manifest file not found: {file}")
    try:
        if file.lower().endswith((".parquet", ".pq")):
            table = pq.read_table(file)
        else:
            # camera_id read as text and checked per row: one bad cell rejects its row only
            types = {"path": pa.string(), "item_id": pa.string(), "split": pa.string(),
                     "camera_id": pa.string()}
            table = pacsv.read_csv(file, convert_options=pacsv.ConvertOptions(
                column_types=types, strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IngestError(f"cannot read manifest file {file}: {msg}") from e
    missing = [c for c in ("path", "item_id") if c not in table.column_names]
    if missing:
        raise IngestError(f"manifest file {file} lacks column(s) {', '.join(missing)} "
                          f"(has {', '.join(table.column_names)})")
    return table


def _camera_value(cam) -> tuple[int | None, str | None]:
    """A manifest camera_id cell -> (int or None, None) or (None, why it is not an int32)."""
    if cam is None or (isinstance(cam, str) and cam.strip() == ""):
        return None, None
    if isinstance(cam, str) and re.fullmatch(r"\s*-?\d+\s*", cam):
        cam = int(cam)
    if not isinstance(cam, int) or isinstance(cam, bool) or not -2**31 <= cam < 2**31:
        return None, f"camera_id {cam!r} is not an int32 integer"
    return cam, None


def scan_manifest(root: str, file: str, query_per_item: int = 1, train_fraction: float = 0.5
                  ) -> Scan:
    """An ingest manifest (CSV/Parquet: path,item_id[,camera_id][,split]) -> Scan.

    A row that breaks the contract (a path that is absolute or leaves the root, by '..' or a
    symlink; no item_id; a camera_id that is not an integer; an unknown split) or whose file
    is missing is rejected with its reason, as --format folders rejects a bad file: one bad row
    never stops the ingest. A path listed twice is an error of the whole file (which row's
    labels hold is unknown).
    """
    _require_dir(root)
    table = read_manifest_file(file)
    paths = table.column("path").to_pylist()
    items = table.column("item_id").to_pylist()
    cams = table.column("camera_id").to_pylist() if "camera_id" in table.column_names else None
    splits = table.column("split").to_pylist() if "split" in table.column_names else None
    scan = Scan()
    rows, seen = [], {}
    for i, (p, item) in enumerate(zip(paths, items)):
        line = i + 1
        try:
            rel = safe_relpath(root, p)
        except PathEscapeError as e:
            scan.rejected.append((str(p), str(e)))
            continue
        if rel in seen:
            raise IngestError(f"manifest file {file}: path {rel!r} appears twice "
                              f"(rows {seen[rel]} and {line})")
        seen[rel] = line
        if item is None or str(item) == "":
            scan.rejected.append((rel, f"row {line} has no item_id"))
            continue
        cam, why = _camera_value(cams[i] if cams is not None else None)
        if why:
            scan.rejected.append((rel, f"row {line}: {why}"))
            continue
        row = {"image_id": rel, "item_id": str(item), "camera_id": cam, "path": rel}
        if splits is not None:
            if splits[i] not in SPLITS:
                why = f"row {line}: split {splits[i]!r} is not one of {', '.join(SPLITS)}"
                scan.rejected.append((rel, why))
                continue
            row["split"] = splits[i]
        if not os.path.isfile(os.path.join(root, *rel.split("/"))):
            scan.rejected.append((rel, "file not found"))
            continue
        rows.append(row)
    scan.rows = rows if splits is not None else assign_splits(rows, query_per_item, train_fraction)
    return scan


# ---------------------------------------------------------------- image checks

def check_image(data: bytes, config: CheckConfig = CheckConfig()) -> CheckedImage:
    """Encoded image bytes -> CheckedImage (ok + bytes to store + 'jpg'/'png', or a reason)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return CheckedImage(False, reason="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; PIL's global one must not warn or leak into callers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
                if w * h > config.max_pixels:
                    return CheckedImage(False, reason=f"too large: {w}x{h} pixels > limit "
                                                      f"{config.max_pixels}")
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                rgb = upright_rgb(im)  # refuses what embed could not convert faithfully
                if config.resize is None and fmt in ("JPEG", "MPO"):
                    return CheckedImage(True, data, "jpg")
                if config.resize is None and fmt == "PNG":
                    return CheckedImage(True, data, "png")
                return _reencode(rgb, fmt, config.resize)
    except UnidentifiedImageError:
        return CheckedImage(False, reason="not an image (PIL cannot identify the format)")
    except Image.DecompressionBombError as e:
        return CheckedImage(False, reason=f"too large: {e}")
    except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError, struct.error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return CheckedImage(False, reason=f"cannot decode: {type(e).__name__}: {msg}".rstrip(": "))


def _reencode(rgb, fmt: str | None, resize: tuple[int, int] | None) -> CheckedImage:
    """An upright RGB image -> JPEG (for JPEG input) or PNG bytes, resized to (H, W) if given."""
    from PIL import Image

    if resize is not None:
        h, w = resize
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if fmt in ("JPEG", "MPO"):
        rgb.save(out, "JPEG", quality=JPEG_QUALITY)
        return CheckedImage(True, out.getvalue(), "jpg")
    rgb.save(out, "PNG")
    return CheckedImage(True, out.getvalue(), "png")


def check_file(path: str, config: CheckConfig = CheckConfig()) -> CheckedImage:
    """check_image on a file's bytes (an unreadable file is a rejection, not an exception)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return CheckedImage(False, reason=f"cannot read: {e.strerror or type(e).__name__}")
    return check_image(data, config)


def _check_task(args: tuple[str, CheckConfig]) -> CheckedImage:
    return check_file(*args)


def iter_checked(root: str, rows: Sequence[dict], config: CheckConfig = CheckConfig(),
                 pool=None) -> Iterator[tuple[dict, CheckedImage]]:
    """(row, CheckedImage) for every row, in the order given. With a multiprocessing `pool`
    the decoding runs there (ordered imap, so results stay deterministic)."""
    tasks = ((os.path.join(root, *r["path"].split("/")), config) for r in rows)
    if pool is None or len(rows) < 64:
        for row, task in zip(rows, tasks):
            yield row, _check_task(task)
        return
    yield from zip(rows, pool.imap(_check_task, tasks, chunksize=32))


@contextlib.contextmanager
def worker_pool(workers: int, n_tasks: int):
    """A process pool for image checks, or None when one process is enough.

    forkserver: workers are forked from a clean server process, not from the caller, whose
    threads (Arrow's pools, Ray) make a plain fork unsafe.
    """
    if workers <= 1 or n_tasks < 64:
        yield None
        return
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        yield pool


# ---------------------------------------------------------------- whole dataset

def scan_dataset(fmt: str, root: str, manifest_file: str | None = None,
                 query_per_item: int = 1, train_fraction: float = 0.5) -> Scan:
    """Dispatch to the adapter for `fmt` (market1501 | folders | manifest)."""
    if fmt == "market1501":
        return scan_market1501(root)
    if fmt == "folders":
        return scan_folders(root, query_per_item, train_fraction)
    if fmt == "manifest":
        if manifest_file is None:
            for name in ("manifest.csv", "manifest.parquet"):
                if os.path.isfile(os.path.join(root, name)):
                    manifest_file = os.path.join(root, name)
                    break
            else:
                raise IngestError("--format manifest needs --manifest FILE "
                                  "(or ROOT/manifest.csv|manifest.parquet)")
        return scan_manifest(root, manifest_file, query_per_item, train_fraction)
    raise ValueError(f"unknown format {fmt!r} (market1501, folders, manifest)")


def build_dataset(scan: Scan, root: str, out_dir: str, config: CheckConfig = CheckConfig(),
                  shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1,
                  progress: Callable[[str, int, int], None] | None = None) -> IngestSummary:
    """Check every scanned image and write out_dir/{manifest.parquet, rejected.parquet,
    shards/<split>-NNNNNN.tar}. Deterministic: rows are processed sorted by image_id.

    `out_dir` should be a fresh temporary directory that the caller moves into place.
    progress(split, done, total) is called as images are checked.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not scan.rows:
        raise IngestError(f"no images found under {root}"
                          + (f" ({len(scan.rejected)} file(s) rejected)" if scan.rejected else ""))
    rejected = list(scan.rejected)
    kept: list[dict] = []
    shard_counts = {}
    by_split: dict[str, list[dict]] = defaultdict(list)
    for r in scan.rows:
        by_split[r["split"]].append(r)
    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    with worker_pool(workers, len(scan.rows)) as pool:
        for split in SPLITS:
            rows = sorted(by_split.get(split, []), key=lambda r: r["image_id"])
            if not rows:
                continue

            def samples(rows=rows, split=split) -> Iterable[tuple[dict, bytes, str]]:
                for done, (row, res) in enumerate(iter_checked(root, rows, config, pool), 1):
                    if progress is not None:
                        progress(split, done, len(rows))
                    if res.ok:
                        kept.append(row)
                        yield row, res.data, res.ext
                    else:
                        rejected.append((row["path"], res.reason))

            shard_counts[split] = len(write_shards(samples(), shard_dir, split, shard_size))
    if not kept:
        raise IngestError(f"no readable images under {root}: all {len(rejected)} rejected")
    manifest = make_manifest_table(kept)
    write_manifest(manifest, os.path.join(out_dir, "manifest.parquet"))
    import pyarrow.parquet as pq

    pq.write_table(make_rejected_table(rejected), os.path.join(out_dir, "rejected.parquet"))
    counts = {s: 0 for s in SPLITS}
    items: dict[str, set] = {s: set() for s in SPLITS}
    for r in kept:
        counts[r["split"]] += 1
        items[r["split"]].add(r["item_id"])
    return IngestSummary(counts=counts, items={s: len(v) for s, v in items.items()},
                         rejected=len(rejected), shards=shard_counts)


def parse_hw(text: str, option: str = "size") -> tuple[int, int]:
    """'256x128' -> (256, 128) as (H, W); ValueError naming `option` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"{option} must be HxW with positive integers (e.g. 256x128), got {text!r}")
    return int(m.group(1)), int(m.group(2))
