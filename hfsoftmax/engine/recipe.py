"""The GPU recipe's settings: their checks, the defaults decided on this machine, and the
backend switches.

Defaults that depend on the machine or the data are resolved once, logged, and stored
resolved in ``args.json`` and checkpoints (no flag's default depends on another flag):

* ``--workers``: this rank's share of the CPU cores (cores / processes on this host) less one
  for the training process itself, between 1 and 16 (0 on a one-core share: load in the
  training process);
* ``--index-threads``: the CPU cores over the processes on this host, for the index process
  only (torchrun sets ``OMP_NUM_THREADS=1``, which the index process would otherwise
  inherit, leaving its rebuilds and queries on one core);
* ``--recall-every``: 200 up to :data:`RECALL_MAX_CLASSES` classes, off above (the
  telemetry's exact search over all rows runs on rank 0's CPU: seconds at 1M classes).

>>> validate_recipe(args)            # raises UsageError naming the flag and the fix
>>> apply_backend_flags(args, device)
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

__all__ = ["validate_recipe", "check_device", "cores_per_process", "default_workers",
           "default_index_threads", "resolve_recall_every", "apply_backend_flags",
           "RECALL_MAX_CLASSES"]

logger = logging.getLogger(__name__)

#: above this many classes the recall telemetry is off unless --recall-every asks for it
RECALL_MAX_CLASSES = 100_000


def _usage(msg: str):
    from .config import UsageError

    return UsageError(msg)


def validate_recipe(args: argparse.Namespace) -> None:
    """Raise :class:`~hfsoftmax.engine.config.UsageError` for a recipe setting that does
    not fit the others (the parser has checked each value's own range)."""
    if args.warmup_steps and args.warmup_epochs:
        raise _usage(f"give --warmup-steps ({args.warmup_steps}) or --warmup-epochs "
                     f"({args.warmup_epochs:g}), not both")
    if args.lr_schedule != "step" and args.lr_steps:
        raise _usage(f"--lr-steps {args.lr_steps} applies to --lr-schedule step; the "
                     f"{args.lr_schedule} schedule decays by itself (drop --lr-steps)")
    if args.lr_schedule != "step" and args.min_lr >= args.lr:
        raise _usage(f"--min-lr {args.min_lr:g} must be below --lr {args.lr:g}")
    if args.optimizer == "adamw" and args.sampled and args.row_lr_mult in (None, "auto"):
        raise _usage("--optimizer adamw with --sampled: the rows keep their own SGD at --lr x "
                     "--row-lr-mult, and AdamW's --lr (e.g. 0.001) would leave them nearly "
                     "still; give --row-lr-mult (e.g. 100 for lr 0.001: rows at 0.1)")
    if args.amp == "fp16" and not args.split_backward and args.sampled:
        raise _usage("--amp fp16 with the sampled head needs --split-backward (the default): "
                     "its row gradients are computed from the unscaled float32 loss")


def check_device(args: argparse.Namespace, device: torch.device, world: int) -> None:
    """The settings that need a GPU, checked against the resolved device (before the
    process group starts, so a misuse is one line, not a hang)."""
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise _usage("--sync-bn needs GPUs (torch's SyncBatchNorm runs on CUDA tensors "
                     "only); drop it on CPU")


def cores_per_process() -> int:
    """CPU cores this process may use, over the processes torchrun started on this host."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_world))


def default_workers() -> int:
    """Data-loading workers per rank: its cores less one, from 1 to 16 (0 on one core)."""
    share = cores_per_process()
    return 0 if share <= 1 else min(16, share - 1)


def default_index_threads() -> int:
    """Threads of the index process: the host's cores over its processes."""
    return cores_per_process()


def resolve_recall_every(args: argparse.Namespace, num_classes: int) -> int:
    """``--recall-every`` as given, else 200 up to :data:`RECALL_MAX_CLASSES` classes and 0
    (off) above."""
    if args.recall_every is not None:
        return int(args.recall_every)
    if num_classes > RECALL_MAX_CLASSES:
        logger.info("recall telemetry off at %d classes (its exact search over all rows "
                    "runs on rank 0's CPU); --recall-every N turns it on", num_classes)
        return 0
    return 200


def apply_backend_flags(args: argparse.Namespace, device: torch.device) -> None:
    """cuDNN autotuning and TF32 as the flags say (process-wide torch settings; nothing
    happens on CPU but the settings themselves)."""
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    if args.tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    if device.type == "cuda":
        logger.info("cuDNN benchmark %s, TF32 matmul %s / conv %s, channels_last %s",
                    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                    torch.backends.cudnn.allow_tf32, args.channels_last)
