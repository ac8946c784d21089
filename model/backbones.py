"""Backbones: each maps images (B, 3, H, W) to a feature map (B, D, h, w).

- resnet18 / resnet34 / resnet50: torchvision (weights=None: nothing downloaded), with the
  stride of the last stage set by `last_stride` (1 doubles the final map, as in the ReID
  "strong baseline").
- resnet50_ibn_a: IBN-a (Pan et al. 2018): in layers 1-3 the first norm of every bottleneck
  normalises half of its channels with InstanceNorm (affine) and the other half with
  BatchNorm. Parameter names follow the authors' release (`layer1.0.bn1.IN.weight`, `.BN.`)
  so their ImageNet file loads as is.
- efficientnet_lite0: EfficientNet-Lite0 (no squeeze-excite, ReLU6, fixed stem/head), module
  names laid out as timm's `efficientnet_lite0` (conv_stem, bn1, blocks.S.I.conv_pw/...,
  conv_head, bn2). `last_stride=1` turns the stride of stage 6 (the last stride-2 stage) to 1.
"""
from __future__ import annotations

import torch
from torch import nn

LITE0_BN_EPS = 1e-3  # the ImageNet weights were trained in TensorFlow with eps 1e-3

# EfficientNet-Lite0 stages: (expand ratio, kernel, stride, out channels, repeats)
LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class IBN(nn.Module):
    """Instance-Batch Norm: first `ratio` of the channels InstanceNorm, the rest BatchNorm."""

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without avgpool/fc: returns the layer4 feature map."""

    def __init__(self, name: str, last_stride: int = 1):
        super().__init__()
        import torchvision

        ibn = name == "resnet50_ibn_a"
        base = getattr(torchvision.models, "resnet50" if ibn else name)(weights=None)
        if ibn:
            for layer in (base.layer1, base.layer2, base.layer3):
                for block in layer:
                    block.bn1 = IBN(block.bn1.num_features)
        set_resnet_last_stride(base, last_stride)
        self.conv1, self.bn1, self.relu, self.maxpool = base.conv1, base.bn1, base.relu, base.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            base.layer1, base.layer2, base.layer3, base.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def set_resnet_last_stride(resnet: nn.Module, stride: int) -> None:
    """Set the stride of layer4's first block (conv carrying the stride and its shortcut)."""
    block = resnet.layer4[0]
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck vs BasicBlock
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=LITE0_BN_EPS)


class DepthwiseSeparable(nn.Module):
    """Stage-1 block of Lite0: dw conv -> BN -> ReLU6 -> pw conv -> BN (+ skip if shapes match)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, k, stride, k // 2, groups=cin, bias=False)
        self.bn1 = _bn(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.act(self.bn1(self.conv_dw(x)))))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excite: 1x1 expand -> kxk depthwise -> 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.conv_dw = nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False)
        self.bn2 = _bn(mid)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv_pw(x)))
        y = self.act(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk: (B, 3, H, W) -> (B, 1280, H/32, W/32) (H/16 with last_stride 1)."""

    def __init__(self, last_stride: int = 1):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = _bn(32)
        stages, cin = [], 32
        for si, (expand, k, stride, cout, repeats) in enumerate(LITE0_STAGES):
            if si == 5:  # the last stride-2 stage
                stride = last_stride
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(DepthwiseSeparable(cin, cout, k, s) if expand == 1
                              else InvertedResidual(cin, cout, k, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self.bn2 = _bn(1280)
        self.act = nn.ReLU6(inplace=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return self.act(self.bn2(self.conv_head(x)))


def build_backbone(name: str, last_stride: int = 1) -> nn.Module:
    """Backbone by name; see the module docstring for the list."""
    if name in ("resnet18", "resnet34", "resnet50", "resnet50_ibn_a"):
        return ResNetTrunk(name, last_stride)
    if name == "efficientnet_lite0":
        return EfficientNetLite0(last_stride)
    raise ValueError(f"unknown backbone {name!r}")


def lite0_from_efficientnet_pytorch(src: dict[str, torch.Tensor],
                                    target: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Map an efficientnet_pytorch Lite0 state dict onto our (timm-layout) names.

    Both list the same tensors in the same order (stem, per block expand/depthwise/project with
    their BNs, head); BN step counters are not parameters and are skipped. The ImageNet
    classifier (`_fc.*`) has no counterpart and is returned as unused. Every pair must agree
    in shape, else ValueError.
    Returns (state dict with our names, unused source keys).
    """
    src_keys = [k for k in src if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise ValueError(f"EfficientNet-Lite0 weights hold {len(src_keys)} tensors, "
                         f"the backbone expects {len(dst_keys)}")
    out = {}
    for s, d in zip(src_keys, dst_keys):
        if tuple(src[s].shape) != tuple(target[d].shape):
            raise ValueError(f"EfficientNet-Lite0 weights: {s} {tuple(src[s].shape)} does not fit "
                             f"{d} {tuple(target[d].shape)}")
        out[d] = src[s]
    unused = [k for k in src if k.startswith("_fc.")]
    return out, unused
