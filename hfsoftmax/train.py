"""Train a face-embedding backbone with a full softmax or with HF-Softmax.

``python -m hfsoftmax.train --help`` (console entry ``hfsoftmax-train``) lists every flag
(:mod:`hfsoftmax.engine.flags`; precedence with a checkpoint and a YAML file:
:mod:`hfsoftmax.engine.config`). Launch several processes with ``torchrun
--nproc_per_node N -m hfsoftmax.train ...``.

The loop is plain (torchvision's ``train_one_epoch``): per step, load a batch of uint8
images (normalised and flipped on the device: :mod:`hfsoftmax.engine.gpu_data`), compute the
embeddings (DDP over the ranks), the head's loss, backward, one optimizer step of the
backbone (and of the full head's weight): :class:`~hfsoftmax.engine.step.TrainStep`, with
``--amp``, ``--clip-grad-norm`` and the split backward. The LR follows ``--lr-schedule``, a
function of the step (:mod:`hfsoftmax.engine.schedule`). The sampled head's rows are not
trainer parameters: its backward pushes their gradients to the row store, whose SGD updates
them by the sampled head's rule (:mod:`hfsoftmax.heads.sampled_config`, resolved once from
``--sampled-rule`` and the flags given), at the backbone's LR schedule times the rule's
``row_lr_mult``. The host waits on a GPU once per step for the sampled head's selection and
once per logged step for the figures (:class:`~hfsoftmax.engine.step.StepCounters`).

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
from .engine.after import AfterStep
from .engine.checkpoint import Checkpointer
from .engine.config import UsageError, args_to_dict, parse_args, resolve_resume_path
from .engine.data import ShardedBatchSampler
from .engine.gpu_data import build_loader, build_train_images, to_device
from .engine.init_weights import apply_start_weights
from .engine.metrics import ProgressLog, SmoothedValue, format_eta, log_start
from .engine.model import build_backbone_for, prepare_head
from .engine.optim import Precision, build_optimizer
from .engine.recipe import (apply_backend_flags, check_device, default_workers,
                            resolve_recall_every)
from .engine.runtime import RunLock, pick_device, remove_handlers, setup_logging
from .engine.schedule import LRSchedule, schedule_from_args
from .engine.step import StepCounters, TrainModel, TrainStep
from .engine.validate_top1 import HeldoutTop1
from .engine.verify import Verifier
from .fileio import write_json
from .heads.base import correct_count
from .heads.factory import build_head_from_args, logit_kwargs
from .heads.logits import DEFAULT_MARGINS, DEFAULT_SCALE
from .heads.sampled_config import SampledRule, rule_from_args

__all__ = ["main", "run", "TrainModel", "train_one_epoch", "stored_settings"]

logger = logging.getLogger("hfsoftmax.train")


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
def train_one_epoch(step_fn: TrainStep, head: nn.Module, loader, device: torch.device,
                    epoch: int, step: int, total_steps: int, schedule: LRSchedule,
                    args: argparse.Namespace, row_lr_mult: float, progress: ProgressLog,
                    on_step) -> int:
    """Train until the epoch ends or ``total_steps`` is reached; returns the next step.

    The host waits on the device once per logged step (and before a checkpoint or a
    verification): the counters live on the device. ``on_step(step, epoch, end_of_epoch)``
    runs after each step (checkpoints, validation).
    """
    step_fn.backbone.train()
    head.train()
    meters = {k: SmoothedValue(args.print_freq) for k in ("data_s", "step_s")}
    counters = StepCounters(device)
    steps_in_epoch = len(loader)
    lr = None
    t_end = time.perf_counter()
    for i, batch in enumerate(loader):
        if step >= total_steps:
            break
        t_data = time.perf_counter() - t_end
        new_lr = schedule.lr_at(step)
        if new_lr != lr:
            lr = new_lr
            for group in step_fn.optimizer.param_groups:
                group["lr"] = lr
            if hasattr(head, "set_lr"):
                head.set_lr(lr * row_lr_mult)
        images, labels = to_device(batch, device, args.channels_last)
        out = step_fn(images, labels)
        n = labels.shape[0]
        counters.add(out.loss, correct_count(out), n, step)
        meters["data_s"].update(t_data)
        step += 1
        t_now = time.perf_counter()
        meters["step_s"].update(t_now - t_end)
        t_end = t_now

        end_of_epoch = i + 1 == steps_in_epoch
        if step % args.print_freq == 0 or step == total_steps or end_of_epoch:
            loss, acc = counters.read(epoch)  # the global batch's figures
            step_s = meters["step_s"].avg
            row = {"step": step, "epoch": epoch, "loss": loss, "acc": acc, "lr": lr,
                   "step_s": step_s,
                   "img_s": n * hd.world_size() / step_s if step_s > 0 else math.nan,
                   "data_s": meters["data_s"].avg}
            if end_of_epoch and hasattr(head, "coverage"):
                row.update(head.coverage())  # the epoch's negatives: how many, how even
            progress.train(row, f"epoch {epoch} [{i + 1}/{steps_in_epoch}] step "
                                f"{step}/{total_steps}",
                           format_eta(step_s * (total_steps - step)),
                           head.stats() if hasattr(head, "stats") else {})
        elif on_step.due(step, end_of_epoch):
            counters.read(epoch)  # no checkpoint of a model that went NaN since the last log
        on_step(step, epoch, end_of_epoch)
        t_end = time.perf_counter()  # checkpoint/validation time is not data time
    return step


def _close_head(head, store) -> None:
    try:
        if hasattr(store, "wait"):
            store.wait()  # a push in flight notes its rows to the sampler: let it finish
    finally:
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
    data, the sizes, the device) before training starts."""
    world = hd.world_size()
    device = pick_device(args.device)
    os.makedirs(args.save_path, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, pinned copies and NCCL use the current one
    apply_backend_flags(args, device)
    precision = Precision.from_args(args, device)

    try:
        dataset = build_train_images(args)
    except (ValueError, OSError) as e:  # unreadable or inconsistent data: the user's to fix
        raise UsageError(f"training data: {e}") from None
    num_classes = args.num_classes or dataset.num_classes
    if num_classes < dataset.num_classes:
        raise UsageError(f"--num-classes {num_classes} is smaller than the data's "
                         f"{dataset.num_classes} classes")
    args.num_classes = int(num_classes)
    if args.sampled:
        args.recall_every = resolve_recall_every(args, num_classes)
    if args.workers is None:
        args.workers = default_workers()
    if len(dataset) < args.batch_size * world:
        raise UsageError(f"--batch-size {args.batch_size} x {world} process(es) is larger "
                         f"than the {len(dataset)} training images; lower --batch-size")
    batches = ShardedBatchSampler(len(dataset), args.batch_size, hd.rank(), world, args.seed,
                                  flip=args.augment)
    steps_per_epoch = batches.batches_per_epoch
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    loader = build_loader(dataset, batches, args.workers, device)
    try:
        schedule = schedule_from_args(args, steps_per_epoch)
    except ValueError as e:
        raise UsageError(str(e)) from None

    rule = rule_from_args(args) if args.sampled else None
    backbone = build_backbone_for(args, device, world)
    try:
        head, store = build_head_from_args(args, num_classes, rule)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with contextlib.ExitStack() as cleanup:  # the head's index and connections, always
        # late binding: the head and store as _prepare_head leaves them (the store wrapped)
        cleanup.callback(lambda: _close_head(head, store))
        head, store = prepare_head(args, head, store, device)
        optimizer = build_optimizer(args, [backbone, head], device)
        settings = stored_settings(args, rule)
        ckpt = Checkpointer(args.save_path, settings, backbone, head, store, optimizer,
                            schedule, remote=bool(args.ps), precision=precision)
        step = _start_step(args, ckpt, store, device)
        apply_start_weights(args, backbone, head, store, optimizer, step, world)
        hd.barrier()  # every rank registered with the server before anyone pushes
        ddp = None
        if world > 1:
            ddp = {"gradient_as_bucket_view": args.ddp_bucket_view,
                   "static_graph": args.ddp_static_graph,
                   **({"device_ids": [device.index]} if device.type == "cuda" else {})}
        step_fn = TrainStep(backbone, head, optimizer, precision, split=args.split_backward,
                            clip_norm=args.clip_grad_norm, ddp=ddp)
        progress = ProgressLog(args.save_path if hd.is_main() else None)
        cleanup.callback(progress.close)
        if hd.is_main():
            write_json(os.path.join(args.save_path, "args.json"), settings, indent=2,
                       sort_keys=True)
        verifier = Verifier(args.val_bins, os.path.join(args.save_path, "val")) \
            if args.val_bins and hd.is_main() else None
        top1 = HeldoutTop1.from_args(args, num_classes, head, store)
        log_start(args, rule, len(dataset), num_classes, steps_per_epoch, step,
                  total_steps, device, schedule)
        after = AfterStep(args, ckpt, verifier, progress, backbone, device, steps_per_epoch,
                          total_steps, top1)
        t0, start_step = time.perf_counter(), step
        for epoch in range(step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch)):
            batches.set_epoch(epoch, step - epoch * steps_per_epoch)
            step = train_one_epoch(step_fn, head, loader, device, epoch, step, total_steps,
                                   schedule, args, rule.row_lr_mult if rule else 1.0,
                                   progress, after)
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
        device = pick_device(args.device)  # before the process group: it picks the backend
        check_device(args, device, int(os.environ.get("WORLD_SIZE", "1")))
        try:
            rank, _ = hd.init_distributed(args.dist_backend, args.dist_timeout, device)
        except ValueError as e:  # e.g. nccl asked for a CPU device
            raise UsageError(f"--dist-backend: {e}") from None
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
