"""Train a face-embedding backbone with a full softmax or with HF-Softmax.

``python -m hfsoftmax.train --help`` (console entry ``hfsoftmax-train``) lists every flag
(:mod:`hfsoftmax.engine.flags`; precedence with a checkpoint and a YAML file:
:mod:`hfsoftmax.engine.config`). Launch several processes with ``torchrun
--nproc_per_node N -m hfsoftmax.train ...``.

The loop is plain (torchvision's ``train_one_epoch``): per step, load a batch, compute the
embeddings (DDP over the ranks), the head's loss, backward, one SGD step of the backbone
(and of the full head's weight). The sampled head's rows are not trainer parameters: its
backward pushes their gradients to the row store, whose SGD updates them by the sampled
head's rule (:mod:`hfsoftmax.heads.sampled_config`, resolved once from ``--sampled-rule``
and the flags given), at the backbone's LR schedule times the rule's ``row_lr_mult``.

Distributed: every rank is a parameter-server worker (``worker_id = rank``); the sampled
head selects classes over the gathered global batch on rank 0 and broadcasts them, so W
ranks at batch B train exactly like one process at batch W*B (for a batch-independent
backbone: BatchNorm's statistics are per rank). Outputs in ``--save-path``: ``last.pth``
and ``best.pth`` (checkpoints), ``rows_step*.safetensors`` (the in-process row store at the
checkpoint's step; a server writes ``<table>/rows_step*`` in its own snapshot folder),
``train.log``, ``metrics.csv``, ``val.csv`` and TensorBoard events in ``tb/``.

>>> python -m hfsoftmax.train --train-rec datasets/data/synthetic --arch convnet-s \\
...     --sampled --sampler hnsw --sample-num 500 --max-steps 300 --save-path runs/demo
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from typing import Any, Sequence

import torch
from torch import nn

from . import distributed as hd
from .engine.checkpoint import Checkpointer
from .engine.config import UsageError, args_to_dict, parse_args, resolve_resume_path
from .engine.data import FlipDataset, ShardedBatchSampler, build_train_dataset
from .engine.init_weights import apply_start_weights
from .engine.metrics import ProgressLog, SmoothedValue, format_eta, log_start
from .engine.runtime import RunLock, pick_device, remove_handlers, setup_logging
from .engine.schedule import StepSchedule
from .engine.validate_top1 import HeldoutTop1
from .engine.verify import Verifier
from .fileio import write_json
from .heads.base import correct_count
from .heads.factory import build_head_from_args, logit_kwargs
from .heads.logits import DEFAULT_MARGINS, DEFAULT_SCALE
from .heads.sampled_config import SampledRule, rule_from_args

__all__ = ["main", "run", "TrainModel", "train_one_epoch", "stored_settings"]

logger = logging.getLogger("hfsoftmax.train")


class TrainModel(nn.Module):
    """Backbone + head as one module: ``forward(images, labels) -> HeadOutput``.

    The unit DDP wraps; with ``amp`` the backbone runs under bfloat16 autocast and the head
    (logits, softmax, the row gradients it pushes) in float32.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, amp: bool = False):
        super().__init__()
        self.backbone, self.head, self.amp = backbone, head, amp

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            features = self.backbone(images)
        return self.head(features.float(), labels)


def stored_settings(args: argparse.Namespace, rule: SampledRule | None) -> dict[str, Any]:
    """What a checkpoint and ``args.json`` keep: the flags, with the sampled head's rule and
    a margin head's scale and margin as they ran (resolved), so that a later change of a
    default does not change a resumed run."""
    out = {**args_to_dict(args), **(rule.to_dict() if rule is not None else {})}
    if args.head != "linear":
        kw = logit_kwargs(args)
        out.update(scale=float(kw.get("s", DEFAULT_SCALE)),
                   margin=float(kw.get("m", DEFAULT_MARGINS[args.head])))
    return out


# --------------------------------------------------------------------------- the loop
def train_one_epoch(model: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer,
                    loader, device: torch.device, epoch: int, step: int, total_steps: int,
                    schedule: StepSchedule, args: argparse.Namespace, row_lr_mult: float,
                    progress: ProgressLog, on_step) -> int:
    """Train until the epoch ends or ``total_steps`` is reached; returns the next step.

    ``on_step(step, epoch, end_of_epoch)`` runs after each step (checkpoints, validation).
    """
    model.train()
    meters = {k: SmoothedValue(args.print_freq) for k in ("data_s", "step_s")}
    # loss sum, correct (margin-free), count since the last log line: on the device, read
    # once per logged step
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    steps_in_epoch = len(loader)
    lr = None
    t_end = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        if step >= total_steps:
            break
        t_data = time.perf_counter() - t_end
        new_lr = schedule.lr_at(step)
        if new_lr != lr:
            lr = new_lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            if hasattr(head, "set_lr"):
                head.set_lr(lr * row_lr_mult)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)

        out = model(images, labels)
        loss = out.loss
        # note: a CPU-GPU sync point; one per step is the price of failing fast on NaN.
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"Loss became infinite or NaN at step={step} "
                                     f"(epoch {epoch}, loss={loss_value}); lower --lr or "
                                     "check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        n = labels.shape[0]
        sums += torch.stack([loss.detach().double() * n, correct_count(out).double(),
                             torch.tensor(float(n), dtype=torch.float64, device=device)])
        meters["data_s"].update(t_data)
        step += 1
        t_now = time.perf_counter()
        meters["step_s"].update(t_now - t_end)
        t_end = t_now

        if step % args.print_freq == 0 or step == total_steps or i + 1 == steps_in_epoch:
            # The global batch's figures (on the device: NCCL reduces only CUDA tensors).
            tot = hd.all_reduce_mean(sums).cpu() * hd.world_size()
            sums.zero_()
            step_s = meters["step_s"].avg
            row = {"step": step, "epoch": epoch, "loss": float(tot[0] / tot[2]),
                   "acc": float(tot[1] / tot[2]), "lr": lr, "step_s": step_s,
                   "img_s": n * hd.world_size() / step_s if step_s > 0 else math.nan,
                   "data_s": meters["data_s"].avg}
            if i + 1 == steps_in_epoch and hasattr(head, "coverage"):
                row.update(head.coverage())  # the epoch's negatives: how many, how even
            progress.train(row, f"epoch {epoch} [{i + 1}/{steps_in_epoch}] step "
                                f"{step}/{total_steps}",
                           format_eta(step_s * (total_steps - step)),
                           head.stats() if hasattr(head, "stats") else {})
        on_step(step, epoch, i + 1 == steps_in_epoch)
        t_end = time.perf_counter()  # checkpoint/validation time is not data time
    return step


class AfterStep:
    """What runs after a step: verification on ``--val-bins`` and the held-out top-1 of
    ``--val-filelist`` / ``--val-rec`` (``--val-every`` steps, else each epoch's end, and at
    the end) and checkpoints (``--save-every``, else each epoch's end, at the end, and
    whenever verification improved)."""

    def __init__(self, args, ckpt: Checkpointer, verifier: Verifier | None,
                 progress: ProgressLog, backbone: nn.Module, device: torch.device,
                 steps_per_epoch: int, total_steps: int, top1=None):
        self.args, self.ckpt, self.verifier, self.progress = args, ckpt, verifier, progress
        self.backbone, self.device, self.top1 = backbone, device, top1
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.val: dict[str, float] = {}

    def __call__(self, s: int, epoch: int, end_of_epoch: bool) -> None:
        args, done = self.args, s >= self.total_steps
        is_best = False
        due = (args.val_every and s % args.val_every == 0) or (not args.val_every
                                                                and end_of_epoch) or done
        if args.val_bins and due:
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
        if self.top1 is not None and due:  # --val-filelist / --val-rec (rank 0 only)
            self.val.update(self.top1(s, epoch, self.progress, self.backbone, self.device))
        if done or is_best or (args.save_every and s % args.save_every == 0) \
                or (not args.save_every and end_of_epoch):
            self.ckpt.save(s, s // self.steps_per_epoch, is_best=is_best)


def _close_head(head, store) -> None:
    sampler = getattr(head, "sampler", None)
    if sampler is not None and hasattr(sampler, "close"):
        sampler.close()
    if store is not None:
        store.close()


def _start_step(args, ckpt: Checkpointer, store, device) -> int:
    """The step to start from: the checkpoint's with ``--resume``; else 0, refusing a
    server table that has already been trained (another run's)."""
    if args.resume:
        try:
            return ckpt.restore(resolve_resume_path(args.resume), device)[0]
        except (ValueError, OSError) as e:  # its rows or state do not fit this run
            raise UsageError(f"--resume {args.resume}: {e}") from None
    if store is not None and args.ps:
        tstep = store.info().get("step", 0)
        if tstep:
            raise UsageError(f"the parameter server's table {args.ps_table!r} has already "
                             f"taken {tstep} steps (an earlier run?); pass --resume, a new "
                             "--ps-table name, or restart the server")
    return 0


def run(args: argparse.Namespace) -> dict:
    """Train with parsed ``args``; returns a summary (steps, last figures, paths).

    Raises :class:`~hfsoftmax.engine.config.UsageError` for input that does not fit (the
    data, the sizes) before training starts."""
    world = hd.world_size()
    device = pick_device(args.device)
    os.makedirs(args.save_path, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    try:
        dataset = build_train_dataset(args)
    except (ValueError, OSError) as e:  # unreadable or inconsistent data: the user's to fix
        raise UsageError(f"training data: {e}") from None
    num_classes = args.num_classes or dataset.num_classes
    if num_classes < dataset.num_classes:
        raise UsageError(f"--num-classes {num_classes} is smaller than the data's "
                         f"{dataset.num_classes} classes")
    args.num_classes = int(num_classes)
    if len(dataset) < args.batch_size * world:
        raise UsageError(f"--batch-size {args.batch_size} x {world} process(es) is larger "
                         f"than the {len(dataset)} training images; lower --batch-size")
    batches = ShardedBatchSampler(len(dataset), args.batch_size, hd.rank(), world, args.seed,
                                  flip=args.augment)
    steps_per_epoch = batches.batches_per_epoch
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    loader = torch.utils.data.DataLoader(FlipDataset(dataset), batch_sampler=batches,
                                         num_workers=args.workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=False)

    from .models import build_backbone

    rule = rule_from_args(args) if args.sampled else None
    backbone = build_backbone(args.arch, args.embedding_size).to(device)
    try:
        head, store = build_head_from_args(args, num_classes, rule)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with contextlib.ExitStack() as cleanup:  # the head's index and connections, always
        cleanup.callback(_close_head, head, store)
        head = head.to(device)
        model = TrainModel(backbone, head, amp=args.amp)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        schedule = StepSchedule.from_epochs(args.lr, args.lr_steps, steps_per_epoch,
                                            args.gamma, args.warmup_steps)
        settings = stored_settings(args, rule)
        ckpt = Checkpointer(args.save_path, settings, backbone, head, store, optimizer,
                            schedule, remote=bool(args.ps))
        step = _start_step(args, ckpt, store, device)
        apply_start_weights(args, backbone, head, store, optimizer, step, world)
        hd.barrier()  # every rank registered with the server before anyone pushes
        if world > 1:
            ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
            model = nn.parallel.DistributedDataParallel(model, **ddp_kw)
        progress = ProgressLog(args.save_path if hd.is_main() else None)
        cleanup.callback(progress.close)
        if hd.is_main():
            write_json(os.path.join(args.save_path, "args.json"), settings, indent=2,
                       sort_keys=True)
        verifier = Verifier(args.val_bins, os.path.join(args.save_path, "val")) \
            if args.val_bins and hd.is_main() else None
        top1 = HeldoutTop1.from_args(args, num_classes, head, store)
        log_start(args, rule, len(dataset), num_classes, steps_per_epoch, step,
                   total_steps, device)
        after = AfterStep(args, ckpt, verifier, progress, backbone, device, steps_per_epoch,
                          total_steps, top1)
        t0, start_step = time.perf_counter(), step
        for epoch in range(step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch)):
            batches.set_epoch(epoch, step - epoch * steps_per_epoch)
            step = train_one_epoch(model, head, optimizer, loader, device, epoch, step,
                                   total_steps, schedule, args,
                                   rule.row_lr_mult if rule else 1.0, progress, after)
            if step >= total_steps:
                break
    elapsed = time.perf_counter() - t0
    summary = {"val": after.val, "steps": step, "start_step": start_step, "seconds": elapsed,
               "save_path": os.path.abspath(args.save_path),
               "checkpoint": os.path.abspath(os.path.join(args.save_path, "last.pth")),
               "best": ckpt.best if math.isfinite(ckpt.best) else None}
    logger.info("done: %d steps in %.1f s; checkpoint %s", step - start_step, elapsed,
                summary["checkpoint"])
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``hfsoftmax-train``; returns the exit status (2: a usage error, named
    in one line on stderr)."""
    handlers: list[logging.Handler] = []
    lock = None
    try:
        args = parse_args(argv)
        rank, _ = hd.init_distributed(args.dist_backend)
        try:
            if rank == 0:
                lock = RunLock(args.save_path).acquire()
            handlers = setup_logging(args.save_path, rank)
            run(args)
        finally:
            remove_handlers(handlers)
            if lock is not None:
                lock.release()
            hd.destroy_distributed()
    except (UsageError, FileNotFoundError) as e:
        print(f"hfsoftmax-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
