"""Identity-balanced batches (P items x M distinct images) read from WebDataset shards.

Mechanism: indexed random access into the tars.
1. `index_shards(urls)` reads every tar's headers once (tarfile seeks past member data, so an
   image's bytes are never read here; only the small `.json` members are) and records, per
   sample, the shard, the byte offset and size of its image member and its manifest row
   (image_id, item_id, camera_id). For a 13k-image training split that is a few hundred KB
   held in numpy arrays; it is built once (by the job driver) and shipped to the workers.
2. `plan_epoch(...)` decides, from (seed, epoch) alone, which images every rank reads at every
   step, so all ranks agree without talking to each other.
3. `ShardReader.read(i)` fetches one image by a positioned read (`os.pread` locally,
   `RandomAccessFile.read_at` for pyarrow URIs such as s3:// or gs://: both thread-safe), so a
   batch costs P x M small reads wherever the shards are.
Why not a streaming per-item buffer: with shards written in image_id order (items contiguous),
a buffer either has to hold most of the split to mix items, or gives batches of neighbouring
items; and DDP ranks cannot agree on "different items in the same step" without a shared plan.
Why not Ray Data grouping: a groupby over all images per epoch is a shuffle of the whole split
for what is a few hundred random reads per step.

Epoch plan (`plan_epoch`), with W ranks:
- Items with fewer than `min_images` (default 2) images are skipped: an item with one image
  has no positive for the triplet loss or CTL. `eligible_items` lists them and the job prints
  how many were dropped.
- Items are shuffled with a generator seeded by (seed, epoch); each global step takes the next
  P x W distinct items, rank r gets items [r*P, (r+1)*P) of the step: ranks never share an
  item within a step. One epoch is ceil(n_items / (P*W)) steps, so every eligible item appears
  at least once per epoch; the last step is completed with items from the next shuffled pass
  (never an item already in that step). `steps` > 0 sets a fixed number of steps instead
  (continuing through further shuffled passes).
- Each item contributes min(M, n_images) DISTINCT images drawn without replacement (seeded by
  (seed, epoch, step)): an item with fewer than M images contributes all of them, so a batch
  may hold fewer than P x M images. Nothing is padded, nothing duplicated.
- Deterministic: the same (index, P, M, W, seed, epoch, steps) give the same batches.
"""
from __future__ import annotations

import os
import tarfile
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from model.shards import checked_row

IMAGE_EXTS = ("jpg", "png")


class ShardIndexWarning(UserWarning):
    """Part of a shard could not be indexed (truncated, corrupt)."""


@dataclass
class SampleIndex:
    """Where every sample's image lies. urls: shard paths/URIs; per sample (N,) arrays:
    shard int32 (position in urls), offset int64, size int64 (image member bytes), ext ("jpg"/
    "png"), image_id, item_id (str), camera_id int64 (-1 unknown)."""

    urls: list[str]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    ext: np.ndarray
    image_id: np.ndarray
    item_id: np.ndarray
    camera_id: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)

    def subset(self, rows: np.ndarray) -> SampleIndex:
        return SampleIndex(self.urls, self.shard[rows], self.offset[rows], self.size[rows],
                           self.ext[rows], self.image_id[rows], self.item_id[rows],
                           self.camera_id[rows])


def _open_random_access(url: str):
    """(file object with seek/tell/read, size in bytes) for a local path or a pyarrow URI."""
    if "://" in url:  # any pyarrow URI, file:// included (a plain path is the local fast path)
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)
        f = fs.open_input_file(path)
        return f, f.size()
    f = open(url, "rb")  # noqa: SIM115 - closed by the caller
    return f, os.fstat(f.fileno()).st_size


def _split_member(name: str) -> tuple[str | None, str | None]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None, None
    key, ext = base.split(".", 1)
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext.lower()


def _index_one(url: str, shard: int, out: list) -> None:
    f, file_size = _open_random_access(url)
    pending: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = _split_member(member.name)
                if key is None:
                    continue
                entry = pending.setdefault(key, {})
                if ext == "json":
                    row, reason = checked_row(key, tar.extractfile(member).read())
                    if reason is None:
                        entry["row"] = row
                    else:  # one bad sample is left out, never the rest of the shard
                        warnings.warn(f"shard {url}: sample {row['image_id']!r} left out: {reason}",
                                      ShardIndexWarning, stacklevel=3)
                elif ext in IMAGE_EXTS:
                    if member.offset_data + member.size > file_size:
                        raise tarfile.ReadError(f"member {member.name!r} is truncated")
                    entry["img"] = (member.offset_data, member.size, ext)
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        warnings.warn(f"shard {url}: {type(e).__name__}: {e}", ShardIndexWarning, stacklevel=3)
    finally:
        f.close()
    for entry in pending.values():
        if "row" in entry and "img" in entry:
            offset, size, ext = entry["img"]
            out.append((shard, offset, size, ext, entry["row"]))


def index_shards(urls: Sequence[str]) -> SampleIndex:
    """Read the tar headers (and JSON rows) of `urls` once -> SampleIndex, in shard order.

    Samples missing their image or JSON are left out; a corrupt or truncated shard gives a
    ShardIndexWarning and contributes the samples indexed before the damage.
    """
    urls = [os.fspath(u) for u in urls]
    rows: list = []
    for i, url in enumerate(urls):
        _index_one(url, i, rows)
    n = len(rows)
    cams = [r[4].get("camera_id") for r in rows]
    return SampleIndex(
        urls=urls,
        shard=np.fromiter((r[0] for r in rows), np.int32, n),
        offset=np.fromiter((r[1] for r in rows), np.int64, n),
        size=np.fromiter((r[2] for r in rows), np.int64, n),
        ext=np.array([r[3] for r in rows], dtype=object),
        image_id=np.array([str(r[4]["image_id"]) for r in rows], dtype=object),
        item_id=np.array([str(r[4]["item_id"]) for r in rows], dtype=object),
        camera_id=np.array([-1 if c is None else int(c) for c in cams], dtype=np.int64),
    )


class ShardReader:
    """Thread-safe positioned reads of image bytes from the shards of a SampleIndex."""

    def __init__(self, index: SampleIndex):
        self.index = index
        self._files: dict[int, object] = {}
        self._lock = threading.Lock()

    def _file(self, shard: int):
        with self._lock:
            f = self._files.get(shard)
            if f is None:
                url = self.index.urls[shard]
                if "://" in url:
                    f = _open_random_access(url)[0]
                else:
                    f = os.open(url, os.O_RDONLY)
                self._files[shard] = f
            return f

    def read(self, i: int) -> bytes:
        """Encoded image bytes of sample i."""
        shard, offset, size = int(self.index.shard[i]), int(self.index.offset[i]), int(self.index.size[i])
        f = self._file(shard)
        data = os.pread(f, size, offset) if isinstance(f, int) else f.read_at(size, offset)
        if len(data) != size:
            raise OSError(f"short read of {self.index.image_id[i]} from {self.index.urls[shard]}")
        return bytes(data)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                if isinstance(f, int):
                    os.close(f)
                else:
                    f.close()
            self._files.clear()


# ------------------------------------------------------------------------------- epoch plan

def eligible_items(item_ids: Sequence[str], min_images: int = 2,
                   exclude: Iterable[str] = ("-1", "0")) -> dict[str, np.ndarray]:
    """item_id -> sorted (n,) int64 sample rows, for items with >= min_images images.

    Junk ("-1") and distractor ("0") labels are not identities and are excluded by default.
    Returned in sorted item_id order (the class index of an item is its position).
    """
    item_ids = np.asarray(item_ids, dtype=object)
    excluded = set(exclude)
    order = np.argsort(item_ids, kind="stable")
    items, starts = np.unique(item_ids[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    out = {}
    for item, a, b in zip(items, starts, bounds):
        if item in excluded or b - a < min_images:
            continue
        out[str(item)] = np.sort(order[a:b]).astype(np.int64)
    return out


def steps_per_epoch(n_items: int, P: int, world_size: int, steps: int = 0) -> int:
    """Steps that cover every item once: ceil(n_items / (P * world_size)) (or `steps` if > 0)."""
    if steps > 0:
        return steps
    return -(-n_items // (P * world_size))


def plan_epoch(items: dict[str, np.ndarray], P: int, M: int, world_size: int, rank: int,
               seed: int, epoch: int, steps: int = 0) -> list[list[tuple[int, np.ndarray]]]:
    """This rank's batches for one epoch: a list (one per step) of P (class index, sample rows)
    pairs, the rows being min(M, n) distinct images of that item. See the module docstring."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    names = sorted(items)
    n = len(names)
    per_step = P * world_size
    if n < per_step:
        raise ValueError(f"need at least P x workers = {per_step} items with enough images, "
                         f"have {n}")
    n_steps = steps_per_epoch(n, P, world_size, steps)
    rng = np.random.default_rng([seed, epoch])
    queue: deque[int] = deque()
    plan = []
    for step in range(n_steps):
        chosen: list[int] = []
        taken: set[int] = set()
        deferred: list[int] = []
        while len(chosen) < per_step:
            if not queue:
                queue = deque(rng.permutation(n).tolist())
            c = queue.popleft()
            if c in taken:
                deferred.append(c)  # already in this step: keep it for the next step
                continue
            chosen.append(c)
            taken.add(c)
        queue.extendleft(reversed(deferred))
        img_rng = np.random.default_rng([seed, epoch, step])
        picks = []
        for c in chosen:  # draw for every rank's items so the stream is rank-independent
            rows = items[names[c]]
            k = min(M, len(rows))
            picks.append((c, np.sort(img_rng.choice(rows, size=k, replace=False))))
        plan.append(picks[rank * P:(rank + 1) * P])
    return plan


def iter_plan_rows(plan: list[list[tuple[int, np.ndarray]]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Flatten each step to (rows (N,) int64, class labels (N,) int64)."""
    for batch in plan:
        rows = np.concatenate([r for _, r in batch])
        labels = np.concatenate([np.full(len(r), c, np.int64) for c, r in batch])
        yield rows, labels
