"""The trainer's model from its flags: the backbone as the GPU recipe wants it, and the head
made ready for :class:`~hfsoftmax.engine.step.TrainStep`.

>>> backbone = build_backbone_for(args, device, world)
>>> head, store = prepare_head(args, *build_head_from_args(args, num_classes, rule), device)
"""
from __future__ import annotations

import torch
from torch import nn

from .recipe import check_device

__all__ = ["build_backbone_for", "prepare_head"]


def build_backbone_for(args, device: torch.device, world: int) -> nn.Module:
    """``--arch`` on ``device``: SyncBatchNorm with ``--sync-bn`` over several GPUs,
    channels-last memory with ``--channels-last``."""
    from ..models import build_backbone

    backbone = build_backbone(args.arch, args.embedding_size)
    check_device(args, device, world)
    if args.sync_bn and world > 1:
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone.to(device, memory_format=torch.channels_last) if args.channels_last \
        else backbone.to(device)


def prepare_head(args, head, store, device: torch.device):
    """The head on ``device`` with its per-step host checks off (GPU sync points: the
    trainer's datasets check every label as they read it, and
    :class:`~hfsoftmax.engine.step.StepCounters` checks the loss on the device), and with
    ``--split-backward`` the row store on its own thread (pushes overlap the backbone's
    backward); returns ``(head, store)``."""
    head = head.to(device)
    head.check_labels = False
    head.check_finite = False
    if store is not None and args.split_backward:
        from ..heads.push import ThreadedRowStore

        store = head.rowstore = ThreadedRowStore(store)
    return head, store
