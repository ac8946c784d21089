"""The re-identification network: backbone -> pooling -> BN-neck -> bias-free classifier.

As in the ReID "strong baseline" (Luo et al. 2019): the metric losses (triplet, CTL, center)
use the pooled feature before the BN-neck, cross-entropy uses the classifier on the feature
after it, and inference uses the post-BN feature (cosine similarity after L2-normalising).
The BN-neck's bias is frozen at zero so the classifier's decision boundaries pass through the
origin of the embedding space.
"""
from __future__ import annotations

import torch
from torch import nn

from model.backbones import build_backbone
from model.config import ModelConfig
from model.pooling import build_pooling


class ReIDNet(nn.Module):
    """Train mode: forward(x) -> (global feature (B, D), bn feature (B, D), logits (B, C) or None).
    Eval mode: forward(x) -> embedding (B, D) float32 (not L2-normalised): the post-BN
    feature, or the pre-BN one when cfg.neck_feat == "before".
    x: (B, 3, H, W) float, normalised with cfg.mean/std.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.last_stride)
        self.pool = build_pooling(cfg.pooling, cfg.gem_p)
        d = cfg.embedding_dim
        self.bottleneck = nn.BatchNorm1d(d)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(d, cfg.num_classes, bias=False) if cfg.num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor):
        feat = self.pool(self.backbone(x))
        bn = self.bottleneck(feat)
        if not self.training:
            return (feat if self.cfg.neck_feat == "before" else bn).float()
        logits = self.classifier(bn) if self.classifier is not None else None
        return feat, bn, logits

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Inference embedding (B, D) float32, whatever mode the module is in (restored after)."""
        was = self.training
        self.eval()
        try:
            return self(x)
        finally:
            self.train(was)


def build_model(cfg: ModelConfig) -> ReIDNet:
    """A freshly initialised network for `cfg` (no weights loaded, nothing downloaded)."""
    return ReIDNet(cfg)
