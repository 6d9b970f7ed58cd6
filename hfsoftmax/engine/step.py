"""One training step: forward, backward, the optimizer's step; and the step's counters.

:class:`TrainStep` runs the backward in one of two ways:

* **split** (``--split-backward``, the default): ``features = backbone(images)`` under
  autocast; ``f = features.detach().float().requires_grad_()``; the head's float32 loss
  (never scaled) is backpropagated to ``f`` first, which pushes the sampled head's row
  gradients (from the row store's thread, :mod:`hfsoftmax.heads.push`: the push overlaps
  what follows) and fills the full head's weight gradient; then the backbone's backward
  from ``f.grad`` (times the loss scale for float16). Float for float, this is the one
  backward of the fused path, in the same order: the results are equal bit for bit
  (tests/test_split_step.py).
* **fused** (``--no-split-backward``): ``loss = head(backbone(images))``, one
  ``loss.backward()`` (:class:`TrainModel`); the sampled head pushes inside it.

Under DDP the split path wraps the backbone and, for the full head, the head, each in its
own DDP, so the full head's weight gradient is still averaged over the ranks; the fused path
wraps :class:`TrainModel` as one.

**float16 and the loss scaler.** The scale enters at the features (``f.grad`` x scale,
then cast to float16) and, for the full head, its weight gradient is multiplied by the same
power of two (exact), so ``GradScaler.unscale_`` / ``step`` / ``update`` see what a scaled
loss would have given. Where the scaler finds an inf/NaN, the backbone's (and the full
head's) step is skipped and the scale halves. **The sampled head's rows still step**: their
gradients come from the unscaled float32 loss and were pushed, unscaled and finite, before
the backbone's backward overflowed (the row store refuses non-finite gradients); the
overflow is in the backbone's float16 backward, not in the rows' gradient.

>>> step = TrainStep(backbone, head, optimizer, precision, split=True)
>>> out = step(images, labels)          # HeadOutput; the optimizer has stepped
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .. import distributed as hd
from .optim import Precision, clip_backbone

__all__ = ["TrainModel", "TrainStep", "StepCounters"]

logger = logging.getLogger(__name__)


class TrainModel(nn.Module):
    """Backbone + head as one module: ``forward(images, labels) -> HeadOutput``.

    The unit DDP wraps on the fused path; the backbone runs under ``precision``'s autocast
    and the head (logits, softmax, the row gradients it pushes) in float32.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module,
                 precision: Precision | bool | None = None):
        super().__init__()
        if isinstance(precision, bool) or precision is None:  # the older amp=True/False
            precision = Precision("bf16" if precision else "off", "cpu",
                                  torch.bfloat16 if precision else None)
        self.backbone, self.head, self.precision = backbone, head, precision

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        with torch.autocast(images.device.type, dtype=self.precision.dtype or torch.float32,
                            enabled=self.precision.dtype is not None):
            features = self.backbone(images)
        return self.head(features.float(), labels)


def _has_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class TrainStep:
    """Forward, backward (split or fused) and the optimizer's step of one batch; see the
    module docstring. ``ddp``: DistributedDataParallel keyword arguments (``device_ids``,
    ``gradient_as_bucket_view``, ``static_graph``), or None without a process group.
    ``clip_norm``: ``--clip-grad-norm`` (0: off)."""

    def __init__(self, backbone: nn.Module, head: nn.Module,
                 optimizer: torch.optim.Optimizer, precision: Precision, *, split: bool = True,
                 clip_norm: float = 0.0, ddp: dict | None = None):
        if precision.scaler is not None and not split and not _has_params(head):
            raise ValueError("float16 with the sampled head needs the split backward: its "
                             "row gradients must come from the unscaled float32 loss")
        self.backbone, self.head, self.optimizer = backbone, head, optimizer
        self.precision, self.split, self.clip_norm = precision, split, float(clip_norm)
        if split:
            self.fwd_backbone = nn.parallel.DistributedDataParallel(backbone, **ddp) \
                if ddp is not None else backbone
            self.fwd_head = nn.parallel.DistributedDataParallel(head, **ddp) \
                if ddp is not None and _has_params(head) else head
        else:
            model = TrainModel(backbone, head, precision)
            self.model = nn.parallel.DistributedDataParallel(model, **ddp) \
                if ddp is not None else model

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        """Train on one batch; returns the head's output (``loss`` and ``logits`` still
        on the device: no host synchronisation)."""
        scaler = self.precision.scaler
        if self.split:
            with self.precision.autocast():
                features = self.fwd_backbone(images)
            f = features.detach().float().requires_grad_()
            out = self.fwd_head(f, labels)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()  # the head's backward: rows pushed, head weight's gradient
            grad = f.grad
            if scaler is not None:
                scale = scaler.scale(torch.ones((), device=grad.device))  # on the device
                grad = grad * scale
                head_grads = [p.grad for p in self.head.parameters() if p.grad is not None]
                if head_grads:
                    torch._foreach_mul_(head_grads, scale)
            if features.requires_grad:  # a frozen backbone (--freeze-backbone-steps) has none
                features.backward(grad.to(features.dtype))
        else:
            out = self.model(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            (scaler.scale(out.loss) if scaler is not None else out.loss).backward()
        self._optimizer_step()
        return out

    def _optimizer_step(self) -> None:
        scaler = self.precision.scaler
        if scaler is None:
            clip_backbone(self.backbone, self.clip_norm)
            self.optimizer.step()
            return
        if self.clip_norm:
            scaler.unscale_(self.optimizer)
            clip_backbone(self.backbone, self.clip_norm)
        scaler.step(self.optimizer)  # skipped where the gradients hold inf/NaN
        scaler.update()              # ... and then the scale halves


class StepCounters:
    """The loss sum, correct count and non-finite losses since the last :meth:`read`, kept on
    the device (no host synchronisation per step): :meth:`read` is the one per logged step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.count = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int, step: int) -> None:
        loss = loss.detach()
        bad = ~torch.isfinite(loss)
        self.sums += torch.stack([loss.double() * n, correct.double(), bad.double()])
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        self.count += n

    def read(self, epoch: int) -> tuple[float, float]:
        """``(mean loss, accuracy)`` over the global batch since the last read; raises
        ``FloatingPointError`` naming the first step whose loss was not finite."""
        # note: the CPU-GPU sync point of a logged step (NCCL reduces only CUDA tensors)
        tot = hd.all_reduce_mean(self.sums) * hd.world_size()
        vals = torch.cat([tot, self.first_bad.double().view(1)]).cpu()
        count = self.count * hd.world_size()
        self.sums.zero_()
        self.count = 0
        if vals[2] > 0:
            bad = int(vals[3])
            where = f"step={bad}" if bad >= 0 else "a step of another rank"
            self.first_bad.fill_(-1)
            raise FloatingPointError(f"Loss became infinite or NaN at {where} (epoch {epoch}); "
                                     "lower --lr or check the data")
        return float(vals[0] / count), float(vals[1] / count)
