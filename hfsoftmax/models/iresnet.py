"""InsightFace's IResNet ("improved residual networks" as used by ArcFace).

Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019
(the "IR" network of its section 3.2; ``iresnet*`` in InsightFace's arcface_torch). A
pre-activation-style block ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` with the
stride on the *second* convolution, a 3x3 stride-1 stem, and four stride-2 stages
(112 -> 56 -> 28 -> 14 -> 7), then the flattened 7x7 map to the embedding.

>>> net = build_backbone("ir100", embedding_size=512)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .embedding import FlatEmbedding
from .registry import register_backbone

__all__ = ["IBasicBlock", "IResNet"]


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """The IResNet trunk plus the flattened embedding layer."""

    def __init__(self, layers: list[int], embedding_size: int = 512, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False),
                                  nn.BatchNorm2d(64), nn.PReLU(64))
        stages, inplanes = [], 64
        for planes, blocks in zip((64, 128, 256, 512), layers):
            stage = [IBasicBlock(inplanes, planes, stride=2)]
            stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.embedding = FlatEmbedding(512, 7, embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # arcface_torch's choice: N(0, 0.1) for every convolution.
                nn.init.normal_(m.weight, 0.0, 0.1)
        # Every residual branch starts at zero (arcface_torch's zero_init_residual option):
        # without it an untrained ir100 in eval mode overflows to inf through 49 summed
        # branches, and the deep variants train less stably from scratch.
        for m in self.modules():
            if isinstance(m, IBasicBlock):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.embedding(x)


@register_backbone("ir18")
def ir18(embedding_size: int = 512) -> IResNet:
    """IResNet-18: stages of 2, 2, 2, 2 blocks."""
    return IResNet([2, 2, 2, 2], embedding_size)


@register_backbone("ir34")
def ir34(embedding_size: int = 512) -> IResNet:
    """IResNet-34: stages of 3, 4, 6, 3 blocks."""
    return IResNet([3, 4, 6, 3], embedding_size)


@register_backbone("ir50")
def ir50(embedding_size: int = 512) -> IResNet:
    """IResNet-50: stages of 3, 4, 14, 3 blocks."""
    return IResNet([3, 4, 14, 3], embedding_size)


@register_backbone("ir100")
def ir100(embedding_size: int = 512) -> IResNet:
    """IResNet-100: stages of 3, 13, 30, 3 blocks."""
    return IResNet([3, 13, 30, 3], embedding_size)
