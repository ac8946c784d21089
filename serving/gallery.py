"""Gallery thumbnails by image_id for the service's page (GET /images/<image_id>).

The source is a dataset root (image_id = the path relative to it, DESIGN.md's manifest rule)
or a shards directory (the samples are read once, at start, for the ids the index holds).
Only image ids of the index being served are answered, and a root-relative path that leaves
the root (.., absolute, symlink out) is refused, so the route reads no other file.
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict

__all__ = ["GalleryImages", "ImageRefused"]

THUMB_HEIGHT = 160


class ImageRefused(ValueError):
    """An image id the service will not read (not in the index, or escaping the root)."""


def _thumbnail(data: bytes, height: int) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.height > height:
        img = img.resize((max(1, round(img.width * height / img.height)), height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class GalleryImages:
    """thumbnail(image_id, known) -> JPEG bytes or None (not found); ImageRefused when refused."""

    def __init__(self, spec: str, image_ids=(), cache: int = 2048, height: int = THUMB_HEIGHT):
        from model.shards import list_shards

        if not os.path.isdir(spec):
            raise FileNotFoundError(f"--gallery-images {spec}: not a directory (dataset root or shards)")
        self.spec = spec
        self.height = height
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_size = cache
        try:
            shards = list_shards(spec)
        except FileNotFoundError:
            shards = []
        self._shard_bytes: dict[str, bytes] | None = None
        if shards:
            from model.shards import iter_shard_samples

            wanted = set(image_ids)
            self._shard_bytes = {}
            for _key, data, _ext, row in iter_shard_samples(shards, on_error=lambda url, e: None):
                if row.get("image_id") in wanted:
                    self._shard_bytes[row["image_id"]] = data

    def _read(self, image_id: str) -> bytes | None:
        if self._shard_bytes is not None:
            return self._shard_bytes.get(image_id)
        from model.ingest import PathEscapeError, safe_relpath

        try:
            rel = safe_relpath(self.spec, image_id)
        except PathEscapeError as e:
            raise ImageRefused(str(e)) from None
        path = os.path.join(self.spec, *rel.split("/"))
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    def thumbnail(self, image_id: str, known) -> bytes | None:
        """`known`: a container of the served index's image ids."""
        if image_id not in known:
            raise ImageRefused(f"image {image_id!r} is not in the index being served")
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        data = self._read(image_id)
        if data is None:
            return None
        thumb = _thumbnail(data, self.height)
        self._cache[image_id] = thumb
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return thumb
