"""Images by image_id for report pictures (evaluate.py --images).

Three sources, told apart by what the path is:
- a shards directory (or make_shards output holding shards/): the samples are read from the
  tar files and only the wanted image ids are kept in memory;
- a manifest Parquet (image_id, path): files at ROOT/path, ROOT = --image-root or the
  manifest's directory;
- a dataset root directory: the image_id is the path relative to it (DESIGN.md manifest rule).
Paths go through embed's own reader (model.embedding.read_file_bytes: absolute paths, '..' and
symlinks out of the root are refused) and bytes through the one decoder (model.transforms:
EXIF orientation, 16-bit and other modes): a refused or undecodable image is shown as its id,
with one line on stderr saying why.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable


def _decoded(image_id: str, data: bytes, reason: str | None):
    """bytes -> upright RGB PIL image, or None with the reason on stderr."""
    import sys

    from model.transforms import ImageDecodeError, decode_image

    if reason is None:
        try:
            return decode_image(data)
        except ImageDecodeError as e:
            reason = str(e)
    print(f"evaluate: picture of {image_id} not shown: {reason}", file=sys.stderr, flush=True)
    return None


def image_reader(spec: str, image_root: str | None = None, wanted: Iterable[str] = ()
                 ) -> Callable[[str], object]:
    """read(image_id) -> PIL RGB image or None. `wanted`: the ids that will be asked for (shards
    are scanned once for them)."""
    from model.embedding import read_file_bytes

    wanted = set(wanted)
    if not os.path.exists(spec) and "://" not in spec:
        raise FileNotFoundError(f"--images {spec}: no such file or directory")
    if spec.endswith(".parquet") or (os.path.isfile(spec) and not spec.endswith(".tar")):
        import pyarrow.parquet as pq

        t = pq.read_table(spec, columns=["image_id", "path"])
        paths = dict(zip(t.column("image_id").to_pylist(), t.column("path").to_pylist()))
        root = image_root or os.path.dirname(os.path.abspath(spec))

        def read_manifest(image_id):
            rel = paths.get(image_id)
            return None if rel is None else _decoded(image_id, *read_file_bytes(root, rel))

        return read_manifest
    from model.shards import list_shards

    try:
        shards = list_shards(spec)
    except FileNotFoundError:
        shards = []
    if not shards:
        root = image_root or spec

        def read_file(image_id):
            data, reason = read_file_bytes(root, image_id)
            if reason is not None and reason.startswith("unreadable file: FileNotFoundError"):
                return None  # not every id has a picture: no noise for a missing file
            return _decoded(image_id, data, reason)

        return read_file
    from model.shards import iter_shard_samples

    found: dict[str, bytes] = {}
    for _key, data, _ext, row in iter_shard_samples(shards, on_error=lambda url, e: None,
                                                    on_bad_sample=lambda url, i, why: None):
        image_id = row.get("image_id")
        if image_id in wanted:
            found[image_id] = data
            if len(found) == len(wanted):
                break

    def read_shard(image_id):
        data = found.get(image_id)
        return None if data is None else _decoded(image_id, data, None)

    return read_shard
