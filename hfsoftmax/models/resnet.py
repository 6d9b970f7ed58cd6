"""ResNet-18/34/50/101 (He et al., 2016) adapted to 112x112 face crops.

Changes from the ImageNet network, as in the original hfsoftmax and most face models: a
3x3 stride-1 stem followed by a stride-2 max pool (ImageNet's 7x7 stride-2 stem plus pool
would shrink a 112 crop to 28x28 before the first block), so the four stages run at
56, 28, 14 and 7 pixels; and the embedding layer flattens the final 7x7 map
(:class:`~hfsoftmax.models.embedding.FlatEmbedding`) instead of global average pooling.
The residual blocks are torchvision's.

>>> net = build_backbone("resnet50", embedding_size=256)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .embedding import FlatEmbedding
from .registry import register_backbone

__all__ = ["FaceResNet"]


class FaceResNet(nn.Module):
    """A ResNet whose input is a 112x112 face and whose output is an embedding."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 embedding_size: int = 256, dropout: float = 0.0):
        super().__init__()
        self.inplanes = 64
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))          # 112 -> 56
        self.layer1 = self._make_stage(block, 64, layers[0], stride=1)   # 56
        self.layer2 = self._make_stage(block, 128, layers[1], stride=2)  # 28
        self.layer3 = self._make_stage(block, 256, layers[2], stride=2)  # 14
        self.layer4 = self._make_stage(block, 512, layers[3], stride=2)  # 7
        self.embedding = FlatEmbedding(512 * block.expansion, 7, embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as identity,
        # which makes the deeper variants train stably from scratch (Goyal et al., 2017).
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_stage(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.embedding(x)


@register_backbone("resnet18")
def resnet18(embedding_size: int = 256) -> FaceResNet:
    """ResNet-18 for 112x112 faces."""
    return FaceResNet(BasicBlock, [2, 2, 2, 2], embedding_size)


@register_backbone("resnet34")
def resnet34(embedding_size: int = 256) -> FaceResNet:
    """ResNet-34 for 112x112 faces."""
    return FaceResNet(BasicBlock, [3, 4, 6, 3], embedding_size)


@register_backbone("resnet50")
def resnet50(embedding_size: int = 256) -> FaceResNet:
    """ResNet-50 (bottleneck blocks) for 112x112 faces."""
    return FaceResNet(Bottleneck, [3, 4, 6, 3], embedding_size)


@register_backbone("resnet101")
def resnet101(embedding_size: int = 256) -> FaceResNet:
    """ResNet-101 (bottleneck blocks) for 112x112 faces."""
    return FaceResNet(Bottleneck, [3, 4, 23, 3], embedding_size)
