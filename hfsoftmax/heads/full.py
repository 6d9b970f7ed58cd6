"""The full-softmax classifier head: every class's row is an ``nn.Parameter`` of the trainer.

>>> head = FullHead(num_classes=1000, dim=256, logit="arcface", s=64.0, m=0.5)
>>> out = head(features, labels); out.loss.backward()
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .base import HeadOutput, check_batch, register_head
from .logits import DEFAULT_SCALE, LogitSpec

__all__ = ["FullHead"]


@register_head("full")
class FullHead(nn.Module):
    """Logits over all ``num_classes`` rows of ``weight`` (linear, cosface or arcface), then
    cross-entropy. ``weight`` (and ``bias`` for the linear head with ``bias=True``) are
    trained by the trainer's torch optimizer."""

    def __init__(self, num_classes: int, dim: int, logit: str = "linear",
                 s: float = DEFAULT_SCALE, m: float | None = None, bias: bool = False,
                 easy_margin: bool = False, std: float = 0.01):
        super().__init__()
        if num_classes <= 0 or dim <= 0:
            raise ValueError(f"FullHead needs num_classes > 0 and dim > 0, got "
                             f"num_classes={num_classes}, dim={dim}")
        self.spec = LogitSpec(logit, s, m, easy_margin)
        if bias and self.spec.normalized:
            raise ValueError(f"bias=True only for the linear head, got logit={logit!r}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * std)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        #: check every batch's labels against num_classes (two host reads: GPU sync points;
        #: the trainer turns it off: its datasets check each label as they read it)
        self.check_labels = True

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, logit={self.spec.logit}, "
                f"s={self.spec.s}, m={self.spec.m}, bias={self.bias is not None}")

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        check_batch(features, labels, self.dim)
        labels = labels.long()
        if self.check_labels and labels.numel() and (
                int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        logits, plain = self.spec.with_plain_target(features, self.weight.to(features.dtype),
                                                    labels, self.bias)
        loss = F.cross_entropy(logits, labels)
        return HeadOutput(loss, logits, labels, plain)
