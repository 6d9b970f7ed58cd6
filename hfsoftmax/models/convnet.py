"""Small plain convnets for CPU demos and tests (not face-recognition-grade models).

A ResNet at 112x112 trains at only ~30-50 images/s on two CPU cores; these run an order of
magnitude faster and still learn the built-in synthetic set. A 4x4 stride-4 "patchify" stem
(112 -> 28, 32 channels; full-resolution feature maps are what make small convnets slow on a
CPU), two 3x3 stride-2 stages (28 -> 14 -> 7, 64 and 128 channels), then the flattened 7x7
map to the embedding.

``convnet-s`` normalises with BatchNorm. ``convnet-s-gn`` uses GroupNorm and LayerNorm,
which normalise each sample on its own: its output for a sample does not depend on the rest
of the batch, so W data-parallel ranks at batch B compute exactly what one process at batch
W*B computes (the trainer's distributed-equivalence test uses it).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_backbone

__all__ = ["SmallConvNet"]

# (out channels, kernel, stride) per stage
_STAGES = ((32, 4, 4), (64, 3, 2), (128, 3, 2))


class SmallConvNet(nn.Module):
    """Three conv-norm-ReLU stages (a patchify stem, two stride-2 3x3) and a linear
    embedding."""

    def __init__(self, embedding_size: int = 256, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        layers: list[nn.Module] = []
        cin = 3
        for cout, k, stride in _STAGES:
            pad = 0 if k == stride else (k - 1) // 2  # the stem tiles the image exactly
            layers += [nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False),
                       nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(8, cout),
                       nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * 7 * 7, embedding_size)
        self.out_norm = (nn.BatchNorm1d(embedding_size) if norm == "batch"
                         else nn.LayerNorm(embedding_size))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.fc(torch.flatten(self.features(x), 1)))


# The small nets train at a smaller scale and margin than the heads' defaults (64, cosface
# 0.35): on the synthetic set at 3 epochs the full softmax reached 88.4 % verification at
# s 30, m 0.2 (benchmarks/ACCURACY.md), and a held-out glyph set (issue 30) measured 90.5 ->
# 94.9 % for the full softmax from s 64 / m 0.35 to s 30 / m 0.2. ArcFace's 0.2 radians is
# chosen by analogy (not measured).
SMALL_NET_HEADS = {"scale": 30.0, "cosface": 0.2, "arcface": 0.2}


@register_backbone("convnet-s", head_defaults=SMALL_NET_HEADS)
def convnet_s(embedding_size: int = 256) -> SmallConvNet:
    """Small BatchNorm convnet for CPU demos."""
    return SmallConvNet(embedding_size, norm="batch")


@register_backbone("convnet-s-gn", head_defaults=SMALL_NET_HEADS)
def convnet_s_gn(embedding_size: int = 256) -> SmallConvNet:
    """Small GroupNorm convnet: per-sample normalisation, batch-size independent."""
    return SmallConvNet(embedding_size, norm="group")
