"""What every classifier head returns, and the head registry."""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np
import torch

__all__ = ["HeadOutput", "correct_count", "register_head", "build_head", "list_heads",
           "check_batch", "RowStoreHeadMixin"]


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


class RowStoreHeadMixin:
    """What the trainer calls on a head whose rows live in a row store (``self.rowstore``),
    shared by :class:`~hfsoftmax.heads.SampledHead` and
    :class:`~hfsoftmax.heads.dist_sampled.DistSampledHead` (listed before ``nn.Module``):
    the rows' learning rate, the step counter a checkpoint keeps (the head holds no
    tensors of its own: the rows are the store's), the telemetry for logs, the wait for a
    push in flight on the store's thread, and the selections' coverage (counts in
    ``self._picks``, one per class, or None)."""

    def set_lr(self, lr: float) -> None:
        """Set the rows' SGD learning rate (the trainer: the backbone's LR x the rule's)."""
        self.rowstore.set_lr(lr)
        self.lr = float(lr)

    def get_extra_state(self):
        """The step counter, for checkpoints."""
        return {"step": self.step}

    def set_extra_state(self, state) -> None:
        """Restore :meth:`get_extra_state`'s step counter."""
        self.step = int(state.get("step", 0))

    def stats(self) -> dict:
        """Telemetry for logs: this head's timings and recall, plus the sampler's figures
        (an index's rebuild time, age and count; the sharded selector's copy refreshes).
        Waits for a push in flight (its thread may be talking to the sampler)."""
        self._wait_push()
        out = dict(self.telemetry)
        if hasattr(self.sampler, "stats"):
            out.update(self.sampler.stats())
        return out

    def _wait_push(self) -> None:
        """Wait for the previous step's push (and its fresh rows) where it runs on the row
        store's thread; raise its error."""
        wait = getattr(self.rowstore, "wait", None)
        if wait is not None:
            t0 = time.perf_counter()
            wait()
            self.telemetry["push_wait_s"] = time.perf_counter() - t0

    def coverage(self, reset: bool = True) -> dict:
        """How the negatives spread over the classes since the last reset (an epoch, as the
        trainer calls it): ``coverage``, the share of classes that were a selected
        non-label column at least once (so received a negative gradient), and
        ``picks_top1pct``, the share of all such picks taken by the 1 % most picked classes
        (about 0.01 for uniform sampling; near 1 when a few "hub" rows are everybody's
        nearest). Counted on this rank's selections (the sharded head: the global
        selections, the same on every rank)."""
        if self._picks is None:
            return {"coverage": 0.0, "picks_top1pct": None}
        picks = self._picks.cpu().numpy()  # one copy per call (an epoch), not per step
        total = int(picks.sum())
        top = np.sort(picks)[::-1][:max(1, self.num_classes // 100)]
        out = {"coverage": float(np.count_nonzero(picks) / self.num_classes),
               "picks_top1pct": float(top.sum() / total) if total else None}
        if reset:
            self._picks.zero_()
        return out
