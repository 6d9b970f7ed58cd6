"""Held-out top-1 during training (``--val-filelist`` / ``--val-rec``): the closed-set
classification accuracy of held-out images of the *training* identities against the
current classifier rows, as the original hfsoftmax logged it beside verification.

For each held-out image the backbone's embedding (eval mode, no flip: the features the
training logits are computed from) is compared with every class row, and the image counts
as right when its label's row scores highest: the plain dot product for the linear head,
the cosine for the margin heads (the scale and the margin change no ranking). The rows are
read from the head's weight (full softmax) or from the row store (sampled head, local or a
parameter server) in chunks of :data:`CHUNK_ROWS`, and the scores of a chunk are computed
for blocks of images small enough that no more than :data:`BLOCK_ELEMENTS` scores exist at
once, so the same code runs at 1M classes with bounded memory. Ties go to the lower class
id. Rank 0 computes it; the other ranks wait.

>>> top1 = Top1Validator.from_args(args, num_classes)
>>> top1(backbone, head, store, device)        # {"top1": 0.83, "images": 4000, ...}
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Top1Validator", "HeldoutTop1", "CHUNK_ROWS", "BLOCK_ELEMENTS", "iter_rows", "top1_of"]

logger = logging.getLogger("hfsoftmax.train")

#: rows read from the row store at a time
CHUNK_ROWS = 65536
#: most scores (images x rows) held at once
BLOCK_ELEMENTS = 1 << 24


def iter_rows(head: nn.Module, store, chunk_rows: int = CHUNK_ROWS
              ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first class id, rows)`` chunks of the classifier: the row store's (sampled head) or
    the head's weight (full softmax)."""
    if store is not None:
        for start, block in store.iter_chunks(chunk_rows):
            yield start, torch.from_numpy(np.ascontiguousarray(block))
        return
    weight = head.weight.detach()
    for start in range(0, weight.shape[0], chunk_rows):
        yield start, weight[start:start + chunk_rows]


@torch.no_grad()
def top1_of(features: torch.Tensor, labels: torch.Tensor, rows, *, cosine: bool,
            device: torch.device | None = None) -> int:
    """How many ``features`` (N, D) have their ``labels``' row as the best-scoring one over
    all ``rows`` (an iterable of ``(first class id, rows chunk)``)."""
    device = features.device if device is None else device
    n = features.shape[0]
    feats = features.to(device, torch.float32)
    if cosine:
        feats = F.normalize(feats, dim=1)
    best = torch.full((n,), -torch.inf, device=device)
    arg = torch.full((n,), -1, dtype=torch.long, device=device)
    for start, chunk in rows:
        w = chunk.to(device, torch.float32)
        if cosine:
            w = F.normalize(w, dim=1)
        block = max(1, BLOCK_ELEMENTS // max(1, w.shape[0]))
        for i in range(0, n, block):
            score, idx = (feats[i:i + block] @ w.T).max(dim=1)
            better = score > best[i:i + block]  # strictly: an earlier (lower) id keeps a tie
            best[i:i + block] = torch.where(better, score, best[i:i + block])
            arg[i:i + block] = torch.where(better, idx + start, arg[i:i + block])
    return int((arg == labels.to(device)).sum())


class Top1Validator:
    """Embeds the held-out images once per call and scores them against the rows."""

    def __init__(self, dataset, *, cosine: bool, batch_size: int = 64, workers: int = 0,
                 name: str = "heldout_top1"):
        if len(dataset) == 0:
            raise ValueError("the held-out set is empty")
        self.dataset, self.cosine, self.name = dataset, bool(cosine), name
        self.batch_size, self.workers = int(batch_size), int(workers)

    @classmethod
    def from_args(cls, args, num_classes: int) -> "Top1Validator":
        """From ``--val-filelist`` [``--val-prefix``] or ``--val-rec``; labels must lie in
        ``[0, num_classes)`` (images of training identities)."""
        from ..data.transforms import eval_transform
        from .workflow_args import val_rec_split

        if args.val_rec:
            from ..data.insightface import InsightFaceRecDataset

            folder, split = val_rec_split(args.val_rec)
            ds = InsightFaceRecDataset(folder, transform=eval_transform(), split=split)
            if ds.num_classes > num_classes:
                raise ValueError(f"--val-rec {args.val_rec}: its property says "
                                 f"{ds.num_classes} classes, the training set has "
                                 f"{num_classes}; held-out images must be of training "
                                 "identities")
        else:
            from ..data.filelist import ImageListDataset

            ds = ImageListDataset(args.val_filelist, args.val_prefix,
                                  transform=eval_transform(), num_classes=num_classes)
        logger.info("held-out top-1: %d images of training identities (%s)", len(ds),
                    args.val_rec or args.val_filelist)
        return cls(ds, cosine=args.head != "linear", batch_size=args.batch_size,
                   workers=min(args.workers, 2))

    def features(self, backbone: nn.Module, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (N, D) of the held-out images (eval mode, no flip) and their labels."""
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                            num_workers=self.workers)
        was_training = backbone.training
        backbone.eval()
        feats, labels = [], []
        try:
            with torch.no_grad():
                for x, y in loader:
                    feats.append(backbone(x.to(device, non_blocking=True)).float())
                    labels.append(y)
        finally:
            backbone.train(was_training)
        f = torch.cat(feats)
        if not torch.isfinite(f).all():
            raise FloatingPointError("the backbone gave NaN or inf features on the held-out "
                                     "images")
        return f, torch.cat(labels).long()

    def __call__(self, backbone: nn.Module, head: nn.Module, store, device: torch.device
                 ) -> dict:
        """``{"top1": fraction right, "images": N, "correct": k}``."""
        feats, labels = self.features(backbone, device)
        correct = top1_of(feats, labels, iter_rows(head, store), cosine=self.cosine,
                          device=device)
        return {"top1": correct / labels.shape[0], "images": int(labels.shape[0]),
                "correct": correct}


class HeldoutTop1:
    """The trainer's round of held-out top-1: rank 0 validates, logs and writes it
    (``val.csv`` row ``heldout_top1``, TensorBoard ``val/heldout_top1``); every rank waits
    for it. ``from_args`` gives None when neither ``--val-filelist`` nor ``--val-rec`` is
    set."""

    def __init__(self, validator: Top1Validator | None, head: nn.Module, store):
        self.validator, self.head, self.store = validator, head, store

    @classmethod
    def from_args(cls, args, num_classes: int, head: nn.Module, store) -> "HeldoutTop1 | None":
        from .. import distributed as hd

        if not (args.val_filelist or args.val_rec):
            return None
        from .config import UsageError

        validator = None
        if hd.is_main():
            try:
                validator = Top1Validator.from_args(args, num_classes)
            except (ValueError, OSError) as e:
                raise UsageError(f"held-out images: {e}") from None
        return cls(validator, head, store)

    def __call__(self, step: int, epoch: int, progress, backbone: nn.Module,
                 device: torch.device) -> dict:
        from .. import distributed as hd

        out = {}
        store = self.store
        if getattr(store, "sharded", False):  # rows over the ranks: every rank sends rank 0
            wait = getattr(store, "wait", None)  # its shard (rank 0 holds them all, once),
            if wait is not None:                 # after the last step's SGD on it
                wait()
            store = store.gather_rows(0)
        if self.validator is not None:
            r = self.validator(backbone, self.head, store, device)
            name = self.validator.name
            progress.top1(step, epoch, name, r["top1"])
            logger.info("step %d held-out top-1: %.4f (%d of %d images of training "
                        "identities)", step, r["top1"], r["correct"], r["images"])
            out[name] = r["top1"]
        hd.barrier()
        return out
