"""Batches of decoded, transformed images from a SampleIndex (see model.sampler).

Decoding and augmenting run in a small thread pool (PIL and torch release the GIL for the heavy
parts), one batch ahead of the training step, inside the training worker: no extra processes
on a small CPU. An image that cannot be read or decoded is left out of its batch and counted
(`BatchLoader.skipped`); the job reports the count instead of crashing on one bad JPEG.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from model.sampler import SampleIndex, ShardReader
from model.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image


class BatchLoader:
    """Iterate (images (N, 3, H, W) float32, labels (N,) int64, rows (N,) int64) for each
    (rows, labels) pair of `batches`, decoding with `transform` in `threads` threads and
    preparing `prefetch` batches ahead."""

    def __init__(self, index: SampleIndex, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                 transform: Callable, threads: int = 2, prefetch: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS, reader: ShardReader | None = None):
        self.index = index
        self.batches = batches
        self.transform = transform
        self.threads = max(1, threads)
        self.prefetch = max(0, prefetch)
        self.max_pixels = max_pixels
        self.reader = reader or ShardReader(index)
        self.skipped: list[str] = []

    def _load(self, i: int):
        try:
            img = decode_image(self.reader.read(int(i)), self.max_pixels)
        except (ImageDecodeError, OSError) as e:
            self.skipped.append(f"{self.index.image_id[i]}: {e}")
            warnings.warn(f"skipping image {self.index.image_id[i]}: {e}", stacklevel=2)
            return None
        return self.transform(img)

    def _assemble(self, pool: ThreadPoolExecutor, rows: np.ndarray, labels: np.ndarray):
        import torch

        tensors = list(pool.map(self._load, rows))
        keep = [k for k, t in enumerate(tensors) if t is not None]
        if not keep:
            return None
        x = torch.stack([tensors[k] for k in keep])
        return x, torch.as_tensor(labels[keep], dtype=torch.int64), rows[keep]

    def __iter__(self) -> Iterator:
        with ThreadPoolExecutor(self.threads) as pool, \
                ThreadPoolExecutor(1) as assembler:
            pending: list[Future] = []
            it = iter(self.batches)
            exhausted = False
            while True:
                while not exhausted and len(pending) <= self.prefetch:
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    pending.append(assembler.submit(self._assemble, pool, *nxt))
                if not pending:
                    return
                out = pending.pop(0).result()
                if out is not None:
                    yield out


def embed_rows(net, index: SampleIndex, rows: np.ndarray, transform: Callable,
               batch_size: int = 128, device: str = "cpu", threads: int = 2,
               max_pixels: int = DEFAULT_MAX_PIXELS, channels_last: bool = False,
               amp: bool = False, flip: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embed the samples `rows` of `index` with `net` in eval mode.

    flip: test-time flip (mean of the image's and its mirror's output, then L2-normalised);
    None = as the network's config says (`flip_test`), like embed.py.
    Returns (rows actually embedded (K,) int64 — unreadable images are left out,
    L2-normalised embeddings (K, D) float32). The module's train/eval mode is restored.
    """
    import torch

    rows = np.asarray(rows, dtype=np.int64)
    batches = ((rows[s:s + batch_size], np.zeros(len(rows[s:s + batch_size]), np.int64))
               for s in range(0, len(rows), batch_size))
    loader = BatchLoader(index, batches, transform, threads=threads, max_pixels=max_pixels)
    if flip is None:
        flip = bool(getattr(getattr(net, "module", net).cfg, "flip_test", False))
    was_training = net.training
    net.eval()
    out_rows, out = [], []
    try:
        with torch.inference_mode():
            for x, _, r in loader:
                x = x.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type="cuda", dtype=torch.float16,
                                    enabled=amp and device.startswith("cuda")):
                    e = net(x).float()
                    if flip:
                        e = (e + net(x.flip(-1)).float()) * 0.5
                out.append(torch.nn.functional.normalize(e, dim=1).cpu().numpy())
                out_rows.append(r)
    finally:
        net.train(was_training)
        loader.reader.close()
    dim = getattr(net, "module", net).cfg.embedding_dim
    if not out:
        return np.empty(0, np.int64), np.empty((0, dim), np.float32)
    return np.concatenate(out_rows), np.concatenate(out).astype(np.float32)
