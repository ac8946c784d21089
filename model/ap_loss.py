"""Listwise average-precision loss (Revaud, Almazan, Rezende, de Souza, "Learning with Average
Precision: Training Image Retrieval with a Listwise Loss", ICCV 2019).

AP is not differentiable because it depends on the ranking. The paper replaces ranking by
soft histogram binning of the similarities: M bin centres b_1 > ... > b_M evenly spaced over
[-1, 1] (cosine similarity), each score s spread over its two nearest bins by the triangular
kernel  delta(s, m) = max(0, 1 - |s - b_m| / Delta),  Delta = 2 / (M - 1); the first and last
bins are open-ended (a score above b_1 counts fully in bin 1, below b_M fully in bin M). With
c_m = sum_j delta(s_j, m) and c+_m the same over the positives, the quantised AP of a query is

    AP_Q = sum_m  P_m * r_m,   P_m = (sum_{m'<=m} c+_m') / (sum_{m'<=m} c_m'),
                               r_m = c+_m / (number of positives),

and the loss is 1 - mean_q AP_Q. This follows the authors' `APLoss` (naver/deep-image-retrieval,
`dirtorch/loss.py`), which builds the same kernels as a fixed 1x1 convolution.

    loss = ap_loss(embeddings, labels, bins=20)   # each image a query against the rest
    loss = APLoss(bins=20)(embeddings, labels)    # the same as a module
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize(scores: torch.Tensor, bins: int = 20, smin: float = -1.0,
             smax: float = 1.0) -> torch.Tensor:
    """Soft-assign scores to `bins` triangular bins, highest bin first.

    scores: (N, L) float -> (N, bins, L) float in [0, 1]; each score's weights sum to 1 when it
    lies inside [smin, smax].
    """
    if bins < 2:
        raise ValueError(f"AP loss needs at least 2 bins, got {bins}")
    delta = (smax - smin) / (bins - 1)
    centres = smax - delta * torch.arange(bins, device=scores.device, dtype=scores.dtype)
    q = 1.0 - (scores.unsqueeze(1) - centres.view(1, bins, 1)).abs() / delta
    q = q.clamp(min=0.0)
    # open-ended end bins: everything above the top centre belongs to the top bin, etc.
    top = torch.where(scores >= centres[0], torch.ones_like(scores), q[:, 0])
    bottom = torch.where(scores <= centres[-1], torch.ones_like(scores), q[:, -1])
    return torch.cat([top.unsqueeze(1), q[:, 1:-1], bottom.unsqueeze(1)], dim=1)


def quantized_ap(scores: torch.Tensor, positives: torch.Tensor, valid: torch.Tensor | None = None,
                 bins: int = 20, smin: float = -1.0, smax: float = 1.0) -> torch.Tensor:
    """Quantised (differentiable) AP of each query's ranked list.

    scores: (N, L) float similarities of N queries to L candidates; positives: (N, L) bool;
    valid: (N, L) bool, False for candidates that take no part (e.g. the query itself).
    Returns (N,) float; NaN for a query with no valid positive (its AP is undefined).
    """
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} "
                         "must both be (N, L)")
    q = quantize(scores, bins, smin, smax)                   # (N, bins, L)
    weight = torch.ones_like(scores) if valid is None else valid.to(scores.dtype)
    q = q * weight.unsqueeze(1)
    pos = positives.to(scores.dtype).unsqueeze(1)
    counts = q.sum(dim=2)                                    # c_m     (N, bins)
    hits = (q * pos).sum(dim=2)                              # c+_m    (N, bins)
    precision = hits.cumsum(dim=1) / counts.cumsum(dim=1).clamp(min=1e-16)
    n_pos = (positives & (weight > 0)).sum(dim=1).to(scores.dtype)
    recall = hits / n_pos.unsqueeze(1)                       # NaN rows when n_pos == 0
    return (precision * recall).sum(dim=1)


def ap_loss(embeddings: torch.Tensor, labels: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """1 - mean quantised AP of a batch, each image a query against the others (see APLoss).

    embeddings: (B, D) float (normalised here); labels: (B,) int. Returns a scalar tensor.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"AP loss expects embeddings (B, D) and labels (B,), got "
                         f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
    x = F.normalize(embeddings.float(), dim=1)
    scores = x @ x.t()
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    positives = (labels.view(-1, 1) == labels.view(1, -1)) & ~eye
    ap = quantized_ap(scores, positives, valid=~eye, bins=bins)
    has_pos = positives.any(dim=1)
    if not bool(has_pos.any()):
        return scores.sum() * 0.0  # zero, but still part of the graph (DDP stays in step)
    return 1.0 - ap[has_pos].mean()


class APLoss(nn.Module):
    """1 - mean quantised AP over a batch, each image a query against the other images.

    forward(embeddings (B, D) float, labels (B,) int) -> scalar loss. Embeddings are
    L2-normalised here so the scores are cosine similarities in [-1, 1]. Queries whose item has
    no other image in the batch have no AP and are left out of the mean; a batch without any
    positive pair gives a zero loss that still carries a (zero) gradient, so DDP stays in step.
    """

    def __init__(self, bins: int = 20):
        super().__init__()
        if bins < 2:
            raise ValueError(f"AP loss needs at least 2 bins, got {bins}")
        self.bins = int(bins)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ap_loss(embeddings, labels, self.bins)

    def extra_repr(self) -> str:
        return f"bins={self.bins}"
