"""Bad image bytes for the fault tests, made in the test (cheap, deterministic)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np


def jpeg(seed: int, size=(32, 16)) -> bytes:
    """A small random JPEG (H, W) = size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def png_bomb(w: int = 20_000, h: int = 20_000) -> bytes:
    """A complete, valid 8-bit RGB PNG of w x h black pixels (20,000 x 20,000: 1.2 GB decoded,
    ~1.2 MB on disk), made in a fraction of a second: one deflate block of 80 zero rows is
    full-flushed so its compressed bytes repeat exactly; it is written h / 80 times, then the
    adler32 of all those zeros (closed form: a = 1, b = n mod 65521)."""
    rows = 80
    assert h % rows == 0, "h must be a multiple of 80"
    block = b"\0" * ((1 + 3 * w) * rows)
    c = zlib.compressobj(9)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush(zlib.Z_FINISH)[:-4]  # the final empty block, without the checksum of 3 blocks
    n = len(block) * (h // rows)
    adler = ((n % 65521) << 16) | 1
    data = first + again * (h // rows - 1) + end + struct.pack(">I", adler)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def bad_images() -> dict[str, bytes]:
    """name -> bytes of every bad image kind the jobs must record and skip."""
    good = jpeg(99)
    return {
        "corrupt.jpg": good[: len(good) // 2],                     # truncated JPEG
        "garbled.jpg": good[:200] + bytes(range(256)) * 4,         # header fine, data garbage
        "empty.jpg": b"",                                          # zero-byte file
        "notes.jpg": b"just some text, not an image\n" * 3,        # a non-image
        "bomb20k.png": png_bomb(20_000, 20_000),                   # over PIL's own bomb limit
        "bomb12k.png": png_bomb(12_000, 12_000),                   # under PIL's, over ours
    }
