"""Periodic verification during training: the pair sets of ``--val-bins``, decoded once."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

__all__ = ["Verifier"]


class Verifier:
    """Verification on ``--val-bins`` (rank 0): each call runs
    :func:`hfsoftmax.eval.evaluate_model` and writes JSON + ROC PNG per set into
    ``out_dir``; returns ``{set name: result}``."""

    def __init__(self, bin_paths: Sequence[str], out_dir: str):
        from ..extract import load_verification_set

        missing = [p for p in bin_paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"--val-bins file(s) not found: {', '.join(missing)}")
        self.sets = [load_verification_set(p) for p in bin_paths]
        self.out_dir = out_dir

    def __call__(self, backbone: nn.Module, device: torch.device, step: int) -> dict:
        from ..eval import evaluate_model

        return evaluate_model(backbone, self.sets, device=device, out_dir=self.out_dir,
                              report_extra={"step": step})
