"""MobileFaceNet: Chen, Liu, Gao, Han, "MobileFaceNets: Efficient CNNs for Accurate
Real-Time Face Verification on Mobile Devices", CCBR 2018 (arXiv 1804.07573), Table 1.

MobileNetV2 inverted-residual bottlenecks with PReLU, and a *global depthwise convolution*
(GDConv, a 7x7 depthwise filter with learned per-position weights) instead of average
pooling, because the centre and the corners of a face crop are not equally informative.
About 1M parameters (at width 1) and well under a GFLOP: the backbone to try on a CPU.

>>> net = build_backbone("mobilefacenet", embedding_size=128)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_backbone

__all__ = ["MobileFaceNet"]


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
            act: bool = True, padding: int | None = None) -> nn.Sequential:
    """Conv (no bias) -> BN -> PReLU (or no activation: a "linear" conv); "same" padding."""
    padding = (k - 1) // 2 if padding is None else padding
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, padding, groups=groups,
                                         bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand (t x) -> 3x3 depthwise (stride) -> linear 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(conv_bn(cin, hidden, 1),
                                  conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


# Table 1 of the paper after the stem: (expansion t, channels c, repeats n, first stride s).
_SETTINGS = [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]


class MobileFaceNet(nn.Module):
    """MobileFaceNet; ``width`` multiplies every channel count (arcface_torch's "mbf" uses 2)."""

    def __init__(self, embedding_size: int = 128, width: int = 1):
        super().__init__()
        c0 = 64 * width
        self.stem = nn.Sequential(conv_bn(3, c0, 3, stride=2),             # 112 -> 56
                                  conv_bn(c0, c0, 3, groups=c0))           # depthwise 3x3
        blocks, cin = [], c0
        for t, c, n, s in _SETTINGS:
            c *= width
            for i in range(n):
                blocks.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)                               # -> 7x7
        self.conv_sep = conv_bn(cin, 512, 1)
        self.gdconv = conv_bn(512, 512, 7, groups=512, act=False, padding=0)        # 7x7 -> 1x1
        # The paper's last layer is a linear 1x1 conv to the embedding; on a 1x1 map that is
        # a Linear layer, followed by BN as in arcface_torch.
        self.embedding = nn.Sequential(nn.Flatten(1), nn.Linear(512, embedding_size, bias=False),
                                       nn.BatchNorm1d(embedding_size))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_sep(self.blocks(self.stem(x)))
        return self.embedding(self.gdconv(x))


@register_backbone("mobilefacenet")
def mobilefacenet(embedding_size: int = 128) -> MobileFaceNet:
    """MobileFaceNet at the paper's width."""
    return MobileFaceNet(embedding_size, width=1)
