"""What every classifier head returns, and the head registry."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["HeadOutput", "correct_count", "register_head", "build_head", "list_heads",
           "check_batch"]


class HeadOutput(NamedTuple):
    """``loss``: mean cross-entropy over the batch; ``logits``: (B, C) over the head's
    columns (all classes, or the sampled ones), the margin applied at the target;
    ``target``: the labels in that column space; ``plain_target``: (B,) each target logit
    without the margin, so that :func:`correct_count` is the accuracy of the model, not of
    the margin (a margin head's ``logits.argmax(1) == target`` stays near 0 while the model
    learns)."""

    loss: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    plain_target: torch.Tensor | None = None


def correct_count(out: HeadOutput) -> torch.Tensor:
    """How many rows' target scores highest without the margin (a 0-dim tensor on the
    logits' device: no host sync). Over the head's columns: all classes for the full head,
    the selected ones for the sampled head. Needs no copy of the logits: the best other
    column is the top-1 unless that is the target, then the top-2."""
    logits = out.logits.detach()
    plain = out.plain_target.detach() if out.plain_target is not None else \
        logits.gather(1, out.target[:, None]).squeeze(1)
    if logits.shape[1] == 1:
        return torch.ones((), dtype=torch.int64, device=logits.device) * logits.shape[0]
    top_v, top_i = logits.topk(2, dim=1)
    other = torch.where(top_i[:, 0] == out.target, top_v[:, 1], top_v[:, 0])
    return (plain >= other).sum()


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
