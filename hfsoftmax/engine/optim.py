"""The trainer's optimizer, mixed precision and gradient clipping.

* :func:`build_optimizer`: ``--optimizer sgd`` (momentum, weight decay) or ``adamw``
  (``--adam-betas``, decoupled weight decay) over the backbone's parameters and the full
  head's weight. On CUDA the fused kernels are used, which also take the loss scaler's
  inverse scale and overflow flag on the device (no host synchronisation in
  ``GradScaler.step``).
* :class:`Precision`: what ``--amp`` means on the resolved device: the autocast dtype
  (bfloat16 only where the GPU has it natively, compute capability 8.0+; float16) and, for
  float16, a :class:`torch.amp.GradScaler`. The head always runs in float32 and its loss is
  never scaled (the sampled head's row gradients are pushed as true gradients); the scale
  enters at the features (:mod:`hfsoftmax.engine.step`).
* :func:`clip_backbone`: ``--clip-grad-norm`` on the backbone's gradients (arcface_torch's
  rule: ``clip_grad_norm_(backbone.parameters(), 5)`` after the scaler's ``unscale_``).

>>> prec = Precision.from_args(args, device)      # UsageError where the device lacks it
>>> opt = build_optimizer(args, [backbone, head], device)
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["build_optimizer", "Precision", "clip_backbone"]

logger = logging.getLogger(__name__)


def build_optimizer(args: argparse.Namespace, modules: list[nn.Module],
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``modules``' trainable parameters (``--optimizer``, ``--lr``,
    ``--weight-decay``; ``--momentum`` for SGD, ``--adam-betas`` for AdamW). The learning
    rate is set by the schedule every step."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    # fused kernels: one launch per step, and GradScaler.step passes them found_inf on the
    # device instead of reading it on the host; on CPU the default (foreach) path
    fused = {"fused": True} if device.type == "cuda" else {}
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, **fused)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas),
                                 weight_decay=args.weight_decay, **fused)
    raise ValueError(f"Invalid optimizer {args.optimizer!r}. Only sgd and adamw are supported.")


@dataclass
class Precision:
    """``dtype``: the backbone's autocast dtype (None: float32); ``scaler``: the float16
    loss scaler (None otherwise); ``device_type``: where autocast runs."""

    mode: str
    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> "Precision":
        """``--amp`` on ``device``; a UsageError where the device cannot do it natively."""
        from .config import UsageError

        mode = args.amp
        if mode == "off":
            return cls(mode, device.type)
        if mode == "bf16":
            if device.type == "cuda" and not torch.cuda.is_bf16_supported(
                    including_emulation=False):
                cap = torch.cuda.get_device_capability(device)
                raise UsageError(f"--amp bf16: this GPU (compute capability {cap[0]}.{cap[1]})"
                                 " has no native bfloat16 (8.0+ has); use --amp fp16")
            return cls(mode, device.type, torch.bfloat16)
        if mode == "fp16":
            scaler = torch.amp.GradScaler(device.type,
                                          growth_interval=args.scaler_growth_interval)
            return cls(mode, device.type, torch.float16, scaler)
        raise UsageError(f"--amp must be off, bf16 or fp16, got {mode!r}")

    def autocast(self):
        """The backbone's autocast context (a no-op context for float32)."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def state_dict(self) -> dict | None:
        """The scaler's state (scale, growth tracker) for checkpoints; None without one."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the scaler's state where both the checkpoint and this run have one (a
        run resumed with another --amp starts its own scale)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def clip_backbone(backbone: nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clip the backbone's gradients to total L2 norm ``max_norm`` (0: off); returns the
    norm before clipping, on the device (no host synchronisation: non-finite norms are the
    loss scaler's business, so ``error_if_nonfinite`` stays off)."""
    if not max_norm:
        return None
    params = [p for p in backbone.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
