"""What every classifier head returns, and the head registry."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["HeadOutput", "register_head", "build_head", "list_heads", "check_batch"]


class HeadOutput(NamedTuple):
    """``loss``: mean cross-entropy over the batch; ``logits``: (B, C) over the head's
    columns (all classes, or the sampled ones); ``target``: the labels in that column space
    (``logits.argmax(1) == target`` is the training accuracy)."""

    loss: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor


_HEADS: dict[str, Callable] = {}


def register_head(name: str):
    """Class decorator adding a head to the registry under ``name`` (duplicates raise)."""
    def deco(cls):
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered ({_HEADS[name]!r})")
        _HEADS[name] = cls
        return cls
    return deco


def list_heads() -> list[str]:
    """The registered head names, sorted."""
    return sorted(_HEADS)


def build_head(name: str, *args, **kwargs):
    """Construct the head registered as ``name`` (``full`` or ``sampled``)."""
    if name not in _HEADS:
        raise ValueError(f"Unknown head {name!r}; valid: {', '.join(list_heads())}")
    return _HEADS[name](*args, **kwargs)


def check_batch(features: torch.Tensor, labels: torch.Tensor, dim: int) -> None:
    """Raise ``ValueError`` naming the mismatch if ``features``/``labels`` are malformed."""
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"features must be a (batch_size, {dim}) tensor, got shape "
                         f"{tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be a 1D tensor of shape (batch_size,) = "
                         f"({features.shape[0]},), got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
