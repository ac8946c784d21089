"""Global pooling heads for retrieval: feature map (B, C, H, W) -> descriptor (B, C).

- `GeM` (Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI
  2018): generalised-mean pooling with a learnable exponent p.
- `RMAC` (Tolias, Sicre, Jegou, "Particular object retrieval with integral max-pooling of CNN
  activations", ICLR 2016): square regions at L scales laid out on the feature map with ~40%
  overlap, each region max-pooled and L2-normalised, the region vectors summed, the sum
  L2-normalised. The region grid is the authors' `rmac_regions` (also in cirtorch's `rmac`),
  plus the whole map as one more region as cirtorch does.

Both are plain nn.Modules: differentiable for training, and usable on any off-the-shelf feature
map (e.g. a torchvision trunk's layer4 output) under torch.no_grad().

    pool = build_pooling("rmac")      # or "gem", "avg", "max"
    desc = pool(feature_map)          # (B, C)
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("avg", "max", "gem", "rmac")

RMAC_OVERLAP = 0.4           # desired overlap of neighbouring regions (Tolias et al.)
RMAC_STEPS = (2, 3, 4, 5, 6, 7)  # candidate numbers of regions along the long side


@lru_cache(maxsize=256)
def rmac_regions(height: int, width: int, levels: int = 3) -> tuple[tuple[int, int, int], ...]:
    """R-MAC square regions on an H x W map, as (top, left, side) in cells, 0-based.

    Level l = 1..L has square regions of side floor(2 min(H, W) / (l + 1)); along the short
    side there are l of them, along the long side l + extra, where `extra` is chosen so that
    neighbouring level-1 regions overlap by about 40% (Tolias et al.'s `rmac_regions`). The
    whole map is NOT included here (see `RMAC(include_global=...)`). Regions of side 0 (maps
    too small for a level) are dropped.
    """
    if height < 1 or width < 1 or levels < 1:
        raise ValueError(f"rmac_regions needs H, W, L >= 1, got {height}, {width}, {levels}")
    w = min(width, height)
    extra = 0
    if height != width:
        long = max(width, height)
        # overlap of two adjacent side-w regions when n of them cover the long side
        overlaps = [abs((w * w - w * (long - w) / (n - 1)) / (w * w) - RMAC_OVERLAP)
                    for n in RMAC_STEPS]
        extra = min(range(len(RMAC_STEPS)), key=overlaps.__getitem__) + 1
    w_extra = extra if height < width else 0
    h_extra = extra if height > width else 0
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * w / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        tops = _region_starts(height, side, half, level + h_extra)
        lefts = _region_starts(width, side, half, level + w_extra)
        regions.extend((t, left, side) for t in tops for left in lefts)
    return tuple(regions)


def _region_starts(size: int, side: int, half: int, count: int) -> list[int]:
    """`count` evenly spread start offsets of side-`side` windows along a `size`-long axis."""
    step = 0.0 if count == 1 else (size - side) / (count - 1)
    return [math.floor(half + i * step) - half for i in range(count)]


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent p: (B, C, h, w) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)  # p < 1 is not a mean any more; keeps pow well-defined
        pooled = F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(p), 1)
        return pooled.pow(1.0 / p).flatten(1)


class RMAC(nn.Module):
    """R-MAC pooling: (B, C, H, W) float -> (B, C) float32, L2-normalised rows.

    levels: number of scales L (3 in the paper). include_global: also add the max-pooled
    whole map as a region (cirtorch does; Tolias et al.'s level 1 covers the short side only).
    normalize: L2-normalise the final sum (set False when a BN-neck follows and you want the
    un-normalised scale; the region vectors are always normalised).

    Each scale's regions share one side length, so a single stride-1 max_pool2d per scale
    gives the max of every window at once and the regions are gathered from it: a few pooling
    calls instead of one slice per region, and plain autograd for training.
    """

    def __init__(self, levels: int = 3, include_global: bool = True, normalize: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        if levels < 1:
            raise ValueError(f"R-MAC needs levels >= 1, got {levels}")
        self.levels = int(levels)
        self.include_global = bool(include_global)
        self.normalize = bool(normalize)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        x = x.float()
        b, c, h, w = x.shape
        total = x.new_zeros(b, c)
        if self.include_global:
            total = total + _l2n(x.amax(dim=(2, 3)), self.eps)
        by_side: dict[int, list[tuple[int, int]]] = {}
        for top, left, side in rmac_regions(h, w, self.levels):
            by_side.setdefault(side, []).append((top, left))
        for side, starts in by_side.items():
            windows = F.max_pool2d(x, kernel_size=side, stride=1)  # (B, C, H-s+1, W-s+1)
            tops = torch.tensor([s[0] for s in starts], device=x.device)
            lefts = torch.tensor([s[1] for s in starts], device=x.device)
            region = windows[:, :, tops, lefts]                     # (B, C, R)
            total = total + _l2n(region, self.eps, dim=1).sum(dim=2)
        return _l2n(total, self.eps) if self.normalize else total

    def extra_repr(self) -> str:
        return f"levels={self.levels}, include_global={self.include_global}"


class AvgPool(nn.Module):
    """Global average pooling: (B, C, H, W) -> (B, C) float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.float().mean(dim=(2, 3))


class MaxPool(nn.Module):
    """Global max pooling (MAC): (B, C, H, W) -> (B, C) float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.float().amax(dim=(2, 3))


def build_pooling(name: str, gem_p: float = 3.0, rmac_levels: int = 3,
                  rmac_normalize: bool = True) -> nn.Module:
    """Pooling head by name: "avg", "max", "gem" (learnable p from `gem_p`) or "rmac"."""
    if name == "avg":
        return AvgPool()
    if name == "max":
        return MaxPool()
    if name == "gem":
        return GeM(gem_p)
    if name == "rmac":
        return RMAC(levels=rmac_levels, normalize=rmac_normalize)
    raise ValueError(f"unknown pooling {name!r}; choose from {list(POOLINGS)}")


def _l2n(x: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    return x / (x.norm(p=2, dim=dim, keepdim=True) + eps)


def _check_map(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"pooling expects a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
