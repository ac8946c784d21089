"""Image decoding and the train / eval transforms (PIL RGB image -> float tensor (3, H, W)).

Train: resize to input_size, horizontal flip (p=0.5), pad 10 + random crop back to input_size,
normalise, random erasing (p=0.5; the erased box holds zeros = the channel mean after
normalising), as in the ReID "strong baseline". Eval: resize + normalise only.
"""
from __future__ import annotations

import io

from model.config import ModelConfig

DEFAULT_MAX_PIXELS = 20_000_000

__all__ = ["DEFAULT_MAX_PIXELS", "BatchEvalTransform", "ImageDecodeError", "decode_image",
           "eval_transform", "resize_uint8", "train_transform", "upright_rgb"]


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image, or an image larger than the pixel guard."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Encoded image bytes (JPEG/PNG/PGM/TIFF/...) -> PIL RGB image, upright.

    The size is checked from the header before any pixel is decoded, so a decompression bomb
    is refused cheaply. Then `upright_rgb`: EXIF orientation applied, every mode converted to
    8-bit RGB (or refused). Raises ImageDecodeError (a ValueError) on corrupt, oversize or
    unconvertible input. Every image door (embed, training, report pictures, make_shards'
    check) decodes through here, so they all see the same pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:  # its message names a memory address, not the bytes
            raise ImageDecodeError("cannot decode image: not a known image format") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageDecodeError(f"image of {w}x{h} pixels exceeds the limit of {max_pixels}")
        img.load()
        return upright_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(f"cannot decode image: {e}".splitlines()[0]) from None


# Modes Pillow's plain convert("RGB") maps correctly (colour-space conversions, palettes, 1-bit).
_CONVERTIBLE = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def upright_rgb(img):
    """A loaded PIL image of any mode -> 8-bit RGB PIL image with its EXIF orientation applied.

    - 16-bit grey (I;16*) and 32-bit integer (I, what Pillow's 16-bit PGM/PNG readers give) are
      scaled from 0..65535 to 0..255; I values outside 0..65535 are refused;
    - 32-bit float (F): values in [0, 1] are scaled by 255, values in [0, 255] kept; others
      (negative, larger, NaN) are refused;
    - transparency (an alpha channel, or a palette / grey / RGB transparent colour) is
      composited onto white, as the image shows on a page;
    - 1-bit, grey, palette, CMYK, YCbCr, LAB, HSV: Pillow's colour conversion.
    Plain convert("RGB") would clip 16-bit pixels to white and keep the unrotated pixels.
    Raises ImageDecodeError for a mode it cannot convert faithfully.
    """
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _WIDE:
        return _wide_to_rgb(img)
    if "A" in mode or "a" in mode or "transparency" in img.info:
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _CONVERTIBLE:
        return img.convert("RGB")
    raise ImageDecodeError(f"unsupported image mode {mode}")


def _wide_to_rgb(img):
    """16/32-bit single-channel image -> 8-bit RGB by its value range (see upright_rgb)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img).astype(np.float32)
    if not np.isfinite(a).all():
        raise ImageDecodeError(f"image of mode {img.mode} has NaN or infinite pixels")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F":
        if lo < 0 or hi > 255:
            raise ImageDecodeError(f"float image pixels in [{lo:g}, {hi:g}], expected [0, 1] or [0, 255]")
        top = 1.0 if hi <= 1.0 else 255.0
    else:
        if lo < 0 or hi > 65535:
            raise ImageDecodeError(f"{img.mode} image pixels in [{lo:g}, {hi:g}], expected 0..65535")
        top = 65535.0
    out = np.rint(a * (255.0 / top)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, "L").convert("RGB")


def eval_transform(cfg: ModelConfig):
    """PIL RGB -> normalised float32 tensor (3, H, W), H, W = cfg.input_size."""
    import torchvision.transforms as T

    return T.Compose([
        T.Resize(cfg.input_size, interpolation=T.InterpolationMode.BILINEAR),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


class BatchEvalTransform:
    """``eval_transform`` split for batches, the same numbers with far less per-image overhead.

    ``resize(img)``: PIL RGB -> (H, W, 3) uint8 array, per image (decode threads may run it);
    ``normalize(arrays)``: N such arrays -> (N, 3, H, W) float32 tensor, one vectorised op for
    the whole batch (per-image ToTensor/Normalize calls cost more than the model at 64x32).
    """

    def __init__(self, cfg: ModelConfig):
        import torch

        self.size = (int(cfg.input_size[1]), int(cfg.input_size[0]))  # PIL wants (W, H)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)

    def resize(self, img):
        return resize_uint8(img, (self.size[1], self.size[0]))

    def normalize(self, arrays):
        import numpy as np
        import torch

        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
        return x.sub_(self.mean).div_(self.std).contiguous()


def resize_uint8(img, size: tuple[int, int]):
    """PIL RGB image -> (H, W, 3) uint8 array at size (H, W), bilinear: the resize of
    eval_transform (torchvision's Resize on a PIL image is this same PIL call)."""
    import numpy as np
    from PIL import Image

    wh = (int(size[1]), int(size[0]))  # PIL wants (W, H)
    if img.size != wh:
        img = img.resize(wh, Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def train_transform(cfg: ModelConfig, flip_p: float = 0.5, pad: int = 10,
                    erase_p: float = 0.5):
    """PIL RGB -> augmented, normalised float32 tensor (3, H, W)."""
    import torchvision.transforms as T

    return T.Compose([
        T.Resize(cfg.input_size, interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(p=flip_p),
        T.Pad(pad),
        T.RandomCrop(cfg.input_size),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
        T.RandomErasing(p=erase_p, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=0),
    ])
