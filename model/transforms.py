"""Image decoding and the train / eval transforms (PIL RGB image -> float tensor (3, H, W)).

Train: resize to input_size, horizontal flip (p=0.5), pad 10 + random crop back to input_size,
normalise, random erasing (p=0.5; the erased box holds zeros = the channel mean after
normalising), as in the ReID "strong baseline". Eval: resize + normalise only.
"""
from __future__ import annotations

import io

from model.config import ModelConfig

DEFAULT_MAX_PIXELS = 20_000_000


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image, or an image larger than the pixel guard."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Encoded image bytes (JPEG/PNG/PGM/...) -> PIL RGB image.

    The size is checked from the header before any pixel is decoded, so a decompression bomb
    is refused cheaply. Raises ImageDecodeError (a ValueError) on corrupt or oversize input.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageDecodeError(f"image of {w}x{h} pixels exceeds the limit of {max_pixels}")
        img.load()
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(f"cannot decode image: {e}".splitlines()[0]) from None


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
        import numpy as np
        from PIL import Image

        if img.size != self.size:  # torchvision's Resize on PIL is this same PIL call
            img = img.resize(self.size, Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, arrays):
        import numpy as np
        import torch

        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
        return x.sub_(self.mean).div_(self.std).contiguous()


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
