"""What runs after a training step: verification and checkpoints (rank 0 writes).

>>> after = AfterStep(args, ckpt, verifier, progress, backbone, device, 100, 1000)
>>> after(step, epoch, end_of_epoch)       # after each step; after.due(...) says if it acts
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .. import distributed as hd
from .checkpoint import Checkpointer
from .metrics import ProgressLog
from .verify import Verifier

__all__ = ["AfterStep"]

logger = logging.getLogger("hfsoftmax.train")


class AfterStep:
    """What runs after a step: verification on ``--val-bins`` and the held-out top-1 of
    ``--val-filelist`` / ``--val-rec`` (``top1``; ``--val-every`` steps, else each epoch's
    end, and at the end) and checkpoints (``--save-every``, else each epoch's end, at the
    end, and whenever verification improved)."""

    def __init__(self, args, ckpt: Checkpointer, verifier: Verifier | None,
                 progress: ProgressLog, backbone: nn.Module, device: torch.device,
                 steps_per_epoch: int, total_steps: int, top1=None):
        self.args, self.ckpt, self.verifier, self.progress = args, ckpt, verifier, progress
        self.backbone, self.device, self.top1 = backbone, device, top1
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.val: dict[str, float] = {}

    def _eval_due(self, s: int, end_of_epoch: bool) -> bool:
        args = self.args
        return bool(args.val_every and s % args.val_every == 0) or (
            not args.val_every and end_of_epoch) or s >= self.total_steps

    def _validates(self, s: int, end_of_epoch: bool) -> bool:
        return bool(self.args.val_bins) and self._eval_due(s, end_of_epoch)

    def due(self, s: int, end_of_epoch: bool) -> bool:
        """Whether step ``s`` verifies or (certainly) writes a checkpoint."""
        args = self.args
        return self._validates(s, end_of_epoch) or s >= self.total_steps or (
            self.top1 is not None and self._eval_due(s, end_of_epoch)) or bool(
            args.save_every and s % args.save_every == 0) or (not args.save_every
                                                              and end_of_epoch)

    def __call__(self, s: int, epoch: int, end_of_epoch: bool) -> None:
        args, done = self.args, s >= self.total_steps
        is_best = False
        if self._validates(s, end_of_epoch):
            if hd.is_main():
                results = self.verifier(self.backbone, self.device, s)
                mean = self.progress.val(s, epoch, results)
                is_best = mean > self.ckpt.best
                self.ckpt.best = max(self.ckpt.best, mean)
                self.val = {n: r.accuracy for n, r in results.items()}
                logger.info("step %d verification: %s (mean %.4f, best %.4f)", s,
                            ", ".join(f"{k} {v:.4f}" for k, v in self.val.items()), mean,
                            self.ckpt.best)
            hd.barrier()
            if self.ckpt.sharded:  # every rank writes its shard of the rows: all must save
                is_best = bool(hd.broadcast(torch.tensor([int(is_best)]), 0, shape=(1,),
                                            dtype=torch.int64))
        if self.top1 is not None and self._eval_due(s, end_of_epoch):  # rank 0 computes
            self.val.update(self.top1(s, epoch, self.progress, self.backbone, self.device))
        if done or is_best or (args.save_every and s % args.save_every == 0) \
                or (not args.save_every and end_of_epoch):
            self.ckpt.save(s, s // self.steps_per_epoch, is_best=is_best)
