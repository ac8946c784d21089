"""Losses of the CTL recipe (DESIGN.md, "Model recipe").

All take a batch of features (B, D) float and integer labels (B,) int64 (item class indices)
and return a scalar tensor. Distances are Euclidean on the raw (not normalised) pre-BN feature,
as in the ReID strong baseline and the CTL authors' code. Batch x batch (or batch x items)
matrices are fine here: B is P x M (e.g. 64).

- batch_hard_triplet: for each anchor, its farthest same-item image and its nearest
  other-item image; mean of relu(d_ap - d_an + margin) over anchors that have both.
- centroid_triplet (CTL, Wieczorek et al. 2021): for each image, the positive is the centroid
  (mean) of the OTHER images of its item in the batch, the negatives are the centroids (means of
  all their images in the batch) of the other items, and the nearest negative centroid is used,
  as in the authors' code; mean of relu(d_pos - d_neg + margin) over images whose item has at
  least one other image in the batch.
- CenterLoss: mean over the batch of ||f_i - c_{y_i}||^2 with learnable centers (C, D); it is
  trained by its own SGD optimiser (see model.training).
- label_smoothed_ce: cross-entropy with targets (1 - eps) * onehot + eps / C.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) Euclidean distances; clamped before sqrt so gradients stay finite."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_triplet(feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Batch-hard triplet loss. feat: (B, D) float, labels: (B,) int64 -> scalar."""
    feat = feat.float()
    dist = euclidean(feat, feat)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=feat.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not valid.any():
        return feat.sum() * 0.0
    d_ap = dist.masked_fill(~pos_mask, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg_mask, float("inf")).amin(1)
    return F.relu(d_ap[valid] - d_an[valid] + margin).mean()


def centroid_triplet(feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Centroid Triplet Loss. feat: (B, D) float, labels: (B,) int64 -> scalar.

    Positive of image i: mean of the other images of its item (leave-one-out centroid).
    Negatives: the centroids of every other item in the batch; the nearest one counts.
    """
    feat = feat.float()
    classes, inv = torch.unique(labels, return_inverse=True)
    k = len(classes)
    sums = torch.zeros(k, feat.shape[1], dtype=feat.dtype, device=feat.device).index_add(0, inv, feat)
    counts = torch.bincount(inv, minlength=k).to(feat.dtype)
    n_own = counts[inv]
    valid = n_own >= 2
    if k < 2 or not valid.any():
        return feat.sum() * 0.0
    # leave-one-out positive centroid; rows of invalid anchors are computed with a safe divisor
    pos = (sums[inv] - feat) / (n_own - 1).clamp(min=1)[:, None]
    d_pos = (feat - pos).pow(2).sum(1).clamp(min=1e-12).sqrt()
    centroids = sums / counts[:, None]
    d_all = euclidean(feat, centroids)                       # (B, K)
    own = inv[:, None] == torch.arange(k, device=feat.device)[None, :]
    d_neg = d_all.masked_fill(own, float("inf")).amin(1)
    return F.relu(d_pos[valid] - d_neg[valid] + margin).mean()


def label_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Cross-entropy with label smoothing. logits: (B, C), labels: (B,) int64 -> scalar."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=eps)


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): mean over the batch of ||f_i - c_{y_i}||^2.

    centers: (num_classes, dim) parameters, initialised N(0, 1) as in the strong baseline.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diff = feat.float() - self.centers[labels]
        return diff.pow(2).sum(1).clamp(min=1e-12, max=1e12).mean()
