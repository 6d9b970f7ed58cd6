"""The layer that turns a backbone's last 7x7 feature map into the face embedding.

InsightFace's "E" output block (BN, dropout, flatten, fully connected, BN): the spatial
layout of a face crop is informative (eyes are always at the top), so the 7x7 map is
flattened rather than average-pooled.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["FlatEmbedding"]


class FlatEmbedding(nn.Sequential):
    """BN2d -> dropout -> flatten -> Linear(C*H*W, E) -> BN1d.

    The final BatchNorm1d's scale is fixed at 1 (as arcface_torch's IResNet): the margin
    head's scale ``s`` sets the logit range, a learned per-dimension gain would only fight it.
    """

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float = 0.0,
                 input_bn: bool = True):
        layers: list[nn.Module] = []
        if input_bn:
            layers.append(nn.BatchNorm2d(channels))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Flatten(1), nn.Linear(channels * spatial * spatial, embedding_size),
                   nn.BatchNorm1d(embedding_size)]
        super().__init__(*layers)
        bn = layers[-1]
        nn.init.ones_(bn.weight)
        bn.weight.requires_grad_(False)
