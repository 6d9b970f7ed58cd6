"""Checkpoints: explicit ``torch.save`` dicts, written atomically, read with weights only.

A checkpoint (``last.pth``, ``best.pth``) holds ``model`` (the backbone's state_dict),
``head`` (the head's state_dict: the full head's weight, or the sampled head's step),
``optimizer``, ``lr_scheduler``, ``step``, ``epoch``, ``args`` (a plain dict of the
settings, so ``--resume`` and feature extraction rebuild the model from it), ``ps_snapshot``
(path of the row store's snapshot taken at the same step, or None for the full head),
``rng`` (the sampler's random state, for an exact resume), ``best`` (best verification
accuracy so far) and ``format`` (this layout's version). Everything is tensors, numbers,
strings, lists and dicts, so ``torch.load(path, weights_only=True)`` reads it and a
downloaded checkpoint cannot run code.

The row snapshot is written first under a step-numbered name, then the checkpoint that
names it replaces the old one (temp file, fsync, ``os.replace``): a crash at any moment
leaves a checkpoint whose snapshot exists and belongs to the same step.

>>> save_checkpoint("runs/x/last.pth", {"model": net.state_dict(), "step": 100, ...})
>>> ckpt = load_checkpoint("runs/x/last.pth")
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..fileio import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT", "rows_snapshot_name",
           "prune_row_snapshots"]

logger = logging.getLogger(__name__)

FORMAT = "hfsoftmax-checkpoint-1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = os.fspath(path)
    with atomic_write(path) as f:
        torch.save({**state, "format": FORMAT}, f)
    logger.info("checkpoint written: %s (step %s)", path, state.get("step"))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check it is one of ours."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not an hfsoftmax checkpoint (a dict with 'model', "
                         f"'head', 'step', 'args', ...)")
    return ckpt


def rows_snapshot_name(step: int) -> str:
    """File name of the row-store snapshot taken at ``step``."""
    return f"rows_step{step:09d}.safetensors"


def prune_row_snapshots(folder: str | os.PathLike, keep: set[str]) -> None:
    """Delete the step-numbered row snapshots in ``folder`` that no checkpoint names.

    Snapshots written by a remote parameter server on another host are not visible here and
    are left alone.
    """
    folder = os.fspath(folder)
    keep = {os.path.basename(k) for k in keep if k}
    for name in os.listdir(folder):
        if name.startswith("rows_step") and name.endswith(".safetensors") and name not in keep:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError as e:  # another process may have removed it
                logger.debug("could not remove old snapshot %s: %s", name, e)
