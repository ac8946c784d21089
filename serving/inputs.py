"""Query images named on the command line: image files, folders (recursively) and lists of paths.

A PATH is an image file, a directory (every image file under it, sorted) or a text/CSV file with
one path per line (a CSV's first column; a header line `path` is skipped; relative paths are
relative to the list's folder). The query id is the path as given for a file, and the path
relative to its folder for images found in a folder or named in a list.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

__all__ = ["IMAGE_EXTENSIONS", "LIST_EXTENSIONS", "QueryImage", "collect_images", "read_query_bytes"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".csv", ".lst")


@dataclass(frozen=True)
class QueryImage:
    """query_id: what the results call it; path: where its bytes are."""

    query_id: str
    path: str


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _from_folder(folder: str) -> list[QueryImage]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if _is_image(f) and not f.startswith("."):
                p = os.path.join(dirpath, f)
                found.append(QueryImage(os.path.relpath(p, folder).replace(os.sep, "/"), p))
    return found


def _from_list(list_file: str) -> list[QueryImage]:
    base = os.path.dirname(os.path.abspath(list_file))
    out = []
    with open(list_file, newline="") as f:
        rows = csv.reader(f) if list_file.lower().endswith(".csv") else ([ln] for ln in f)
        for n, row in enumerate(rows):
            value = (row[0] if row else "").strip()
            if not value or value.startswith("#") or (n == 0 and value.lower() in ("path", "image", "file")):
                continue
            out.append(QueryImage(value, value if os.path.isabs(value) else os.path.join(base, value)))
    return out


def collect_images(paths: list[str]) -> list[QueryImage]:
    """The query images named by `paths` (see the module docstring), in order, duplicates of
    the same query id kept once. Raises FileNotFoundError for a PATH that does not exist and
    ValueError when nothing is found or a PATH is neither an image, a folder nor a list."""
    out: list[QueryImage] = []
    for p in paths:
        if os.path.isdir(p):
            found = _from_folder(p)
            if not found:
                raise ValueError(f"--images {p}: no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) in the folder")
            out += found
        elif os.path.isfile(p):
            if p.lower().endswith(LIST_EXTENSIONS):
                out += _from_list(p)
            elif _is_image(p):
                out.append(QueryImage(p, p))
            else:
                raise ValueError(f"--images {p}: not an image ({', '.join(IMAGE_EXTENSIONS[:3])}, ...), "
                                 f"folder or list of paths ({', '.join(LIST_EXTENSIONS)})")
        else:
            raise FileNotFoundError(f"--images {p}: no such file or directory")
    seen, unique = set(), []
    for q in out:
        if q.query_id not in seen:
            seen.add(q.query_id)
            unique.append(q)
    if not unique:
        raise ValueError("--images: no query images found")
    return unique


def read_query_bytes(q: QueryImage) -> tuple[bytes, str | None]:
    """(bytes, None), or (b"", one-line reason) when the file cannot be read: an error row."""
    try:
        with open(q.path, "rb") as f:
            return f.read(), None
    except OSError as e:
        return b"", f"unreadable file: {type(e).__name__}: {e.strerror or e}"
