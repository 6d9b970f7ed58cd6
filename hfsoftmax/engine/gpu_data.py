"""The training loader that feeds a GPU: uint8 batches through pinned memory, flipped and
normalised on the device.

Workers read and decode only (:class:`~hfsoftmax.data.uint8.Uint8Images`, ``--decoder``);
they persist across epochs (the batch order is drawn in the main process by
:class:`~hfsoftmax.engine.data.ShardedBatchSampler`, so ``set_epoch`` still reaches them);
their number defaults to this rank's share of the cores (:func:`~hfsoftmax.engine.recipe.
default_workers`). :func:`to_device` copies a batch without blocking the host (pinned
source, ``non_blocking``) and runs :func:`~hfsoftmax.data.transforms.normalize_batch`
there: the flips and the ``(x / 255 - 0.5) / 0.5`` of torchvision's transforms, bit for bit
on the CPU.

>>> loader = build_loader(build_train_images(args), batches, workers=7, device=device)
>>> for batch in loader:
...     images, labels = to_device(batch, device, channels_last=True)
"""
from __future__ import annotations

import argparse

import torch

from ..data.transforms import normalize_batch
from ..data.uint8 import Uint8Images, collate_uint8

__all__ = ["build_train_images", "build_loader", "to_device"]


def build_train_images(args: argparse.Namespace) -> Uint8Images:
    """The training set of ``--train-rec``, ``--train-filelist`` or ``--train-folder`` as
    uint8 images decoded by ``--decoder``."""
    if args.train_rec:
        from ..data.insightface import InsightFaceRecDataset

        base = InsightFaceRecDataset(args.train_rec)
    elif getattr(args, "train_folder", None):
        from ..data.folder import ImageFolderDataset

        base = ImageFolderDataset(args.train_folder, num_classes=args.num_classes)
    else:
        from ..data.filelist import ImageListDataset

        base = ImageListDataset(args.train_filelist, args.train_prefix,
                                num_classes=args.num_classes)
    return Uint8Images(base, decoder=args.decoder)


def build_loader(dataset, batch_sampler, workers: int, device: torch.device,
                 prefetch_factor: int = 4) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(uint8 images, labels, flips)`` batches: ``workers`` persistent
    processes (0: in this process), pinned memory where the device is a GPU."""
    kw = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers else {}
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler,
                                       num_workers=workers, collate_fn=collate_uint8,
                                       pin_memory=device.type == "cuda", **kw)


def to_device(batch, device: torch.device, channels_last: bool = False):
    """``(images, labels)`` on ``device``: float32 images in [-1, 1] (flipped where the batch
    says), int64 labels. No host synchronisation (the copies are asynchronous from pinned
    memory on a GPU)."""
    images, labels, flips = batch
    images = images.to(device, non_blocking=True)
    flips = flips.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    return normalize_batch(images, flips, channels_last), labels
