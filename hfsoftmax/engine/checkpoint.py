"""Checkpoints: explicit ``torch.save`` dicts, written atomically, read with weights only.

A checkpoint (``last.pth``, ``best.pth``) holds ``model`` (the backbone's state_dict),
``head`` (the head's state_dict: the full head's weight, or the sampled head's step),
``optimizer``, ``lr_scheduler``, ``step``, ``epoch``, ``args`` (a plain dict of the
settings, so ``--resume`` and feature extraction rebuild the model from it; the sampled
head's rule as it ran, resolved), ``ps_snapshot`` (the row store's snapshot taken at the
same step, or None for the full head: a name relative to the run folder for in-process
rows, relative to the parameter server's snapshot folder for a server's; checkpoints before
this named an absolute path, read as its file name beside the checkpoint; rows sharded over
the ranks, ``--row-store dist``: every rank's file ``<name>.0000r-of-0000W`` beside it),
``ps_kind`` (``local``, ``remote`` or ``dist``),
``rng`` (the sampler's random state, for an exact resume), ``best`` (best verification
accuracy so far), ``scaler`` (the float16 loss scaler's scale and growth count, or None)
and ``format`` (this layout's version). Everything is tensors, numbers,
strings, lists and dicts, so ``torch.load(path, weights_only=True)`` reads it and a
downloaded checkpoint cannot run code.

The row snapshot is written first under a step-numbered name, then the checkpoint that
names it replaces the old one (temp file, fsync, ``os.replace``): a crash at any moment
leaves a checkpoint whose snapshot exists and belongs to the same step. Old snapshots are pruned
only in the run's own folder (in-process rows) or, on a server, only those this process
wrote: resuming a copy of a run folder, or a run whose rows live on a shared server, never
removes the original's.

>>> save_checkpoint("runs/x/last.pth", {"model": net.state_dict(), "step": 100, ...})
>>> ckpt = load_checkpoint("runs/x/last.pth")
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch

from .. import distributed as hd
from ..fileio import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT", "rows_snapshot_name",
           "prune_row_snapshots", "rows_path_beside", "Checkpointer"]

logger = logging.getLogger(__name__)

FORMAT = "hfsoftmax-checkpoint-1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = os.fspath(path)
    with atomic_write(path) as f:
        torch.save({**state, "format": FORMAT}, f)
    logger.info("checkpoint written: %s (step %s)", path, state.get("step"))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check it is one of ours."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, empty, not a torch file, or objects weights_only refuses
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path} is not a readable hfsoftmax checkpoint ({type(e).__name__}: "
                         f"{first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not an hfsoftmax checkpoint (a dict with 'model', "
                         f"'head', 'step', 'args', ...)")
    return ckpt


def rows_snapshot_name(step: int) -> str:
    """File name of the row-store snapshot taken at ``step``."""
    return f"rows_step{step:09d}.safetensors"


def prune_row_snapshots(folder: str | os.PathLike, keep: set[str],
                        shard: tuple[int, int] | None = None) -> None:
    """Delete the step-numbered row snapshots in ``folder`` (the run's own) that no
    checkpoint names; ``shard=(rank, world)``: only that rank's files of sharded rows
    (``<name>.0000r-of-0000W``, each rank prunes its own)."""
    folder = os.fspath(folder)
    keep = {os.path.basename(k) for k in keep if k}
    suffix = f".{shard[0]:05d}-of-{shard[1]:05d}" if shard and shard[1] > 1 else ""
    for name in os.listdir(folder):
        if not name.endswith(suffix):
            continue
        base = name[:len(name) - len(suffix)]
        if base.startswith("rows_step") and base.endswith(".safetensors") and base not in keep:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError as e:  # another process may have removed it
                logger.debug("could not remove old snapshot %s: %s", name, e)


def rows_path_beside(ckpt_path: str, stored: str) -> str:
    """Where the in-process rows of a checkpoint are: its stored snapshot name joined to the
    folder holding the checkpoint (an absolute name, as older checkpoints stored, by its
    file name). Never a path outside that folder, so a copied or edited checkpoint reads
    its own folder's rows."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    name = os.path.basename(stored) if os.path.isabs(stored) else stored
    full = os.path.normpath(os.path.join(folder, name))
    if os.path.dirname(full) != folder and not full.startswith(folder + os.sep):
        raise ValueError(f"{ckpt_path}: row snapshot {stored!r} is outside the checkpoint's "
                         "folder")
    return full


class Checkpointer:
    """Writes ``last.pth`` / ``best.pth`` and the row snapshot of the same step (rank 0), and
    restores them.

    ``settings``: the dict stored as ``args`` (the trainer's flags with the sampled head's
    rule resolved). ``store``: the sampled head's row store, or None. Rows of an in-process
    store go to ``<save_path>/rows_step<N>.safetensors``; a server's to
    ``<table>/rows_step<N>.safetensors`` inside the server's snapshot folder.
    """

    def __init__(self, save_path: str, settings: dict, backbone, head, store, optimizer,
                 schedule, *, remote: bool = False, precision=None):
        self.folder = os.path.abspath(save_path)
        self.settings = settings
        self.backbone, self.head, self.store = backbone, head, store
        self.optimizer, self.schedule = optimizer, schedule
        self.precision = precision  # engine.optim.Precision: the loss scaler's state
        self.remote = bool(remote)
        #: rows sharded over the ranks (``--row-store dist``): every rank writes its shard
        self.sharded = bool(getattr(store, "sharded", False))
        self.best = -math.inf
        self.last_rows: str | None = None
        self.best_rows: str | None = None
        self._written: set[str] = set()  # server snapshots this process wrote

    def _rows_name(self, step: int) -> str:
        if self.remote:
            return f"{self.store.name}/{rows_snapshot_name(step)}"
        return rows_snapshot_name(step)

    def _state(self, step: int, epoch: int, rows: str | None) -> dict:
        sampler = getattr(self.head, "sampler", None)
        rng = getattr(sampler, "rng", None)
        return {"model": self.backbone.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.schedule.state_dict(), "step": step, "epoch": epoch,
                "args": self.settings, "ps_snapshot": rows,
                "ps_kind": None if self.store is None else
                ("remote" if self.remote else "dist" if self.sharded else "local"),
                "rng": {"sampler": json.dumps(rng.bit_generator.state)
                        if rng is not None else None},
                "best": self.best if math.isfinite(self.best) else None,
                "scaler": self.precision.state_dict() if self.precision is not None else None}

    def save(self, step: int, epoch: int, is_best: bool = False) -> None:
        """Rank 0: the rows after exactly ``step`` steps (every rank's push of the step has
        returned, so the store holds them), then the checkpoint naming them. Sharded rows:
        every rank calls it (:meth:`_save_sharded`)."""
        if self.sharded:
            return self._save_sharded(step, epoch, is_best)
        if not hd.is_main():
            return
        rows = None
        if self.store is not None:
            rows = self._rows_name(step)
            if rows != self.last_rows or not (self.remote or os.path.isfile(
                    os.path.join(self.folder, rows))):  # resumed into a new folder
                if self.remote:
                    self.store.snapshot(rows)
                    self._written.add(rows)
                else:
                    self.store.snapshot(os.path.join(self.folder, rows))
        state = self._state(step, epoch, rows)
        previous = self.last_rows
        save_checkpoint(os.path.join(self.folder, "last.pth"), state)
        self.last_rows = rows
        if is_best:
            save_checkpoint(os.path.join(self.folder, "best.pth"), state)
            self.best_rows = rows
        if self.store is None:
            return
        if not self.remote:
            prune_row_snapshots(self.folder, {self.last_rows, self.best_rows})
        elif previous in self._written and previous not in (self.last_rows, self.best_rows):
            self.store.delete_snapshot(previous)
            self._written.discard(previous)

    def _save_sharded(self, step: int, epoch: int, is_best: bool) -> None:
        """Every rank writes its shard of the rows (``rows_step<N>.safetensors.0000r-of-
        0000W``, a sharded server's layout: :mod:`paramserver.reshard` reads it); once all
        are written rank 0 writes the checkpoint naming them; once that is in place every
        rank prunes its own old shard files. ``is_best`` must be the same on every rank."""
        rows = rows_snapshot_name(step)
        full = os.path.join(self.folder, rows)
        if rows != self.last_rows or not os.path.isfile(self.store.shard_path(full)):
            self.store.snapshot(full)
        hd.barrier()                    # every shard is on disk before a checkpoint names it
        if hd.is_main():
            state = self._state(step, epoch, rows)
            save_checkpoint(os.path.join(self.folder, "last.pth"), state)
            if is_best:
                save_checkpoint(os.path.join(self.folder, "best.pth"), state)
        self.last_rows = rows
        if is_best:
            self.best_rows = rows
        hd.barrier()                    # the checkpoints name the new shards: old ones may go
        prune_row_snapshots(self.folder, {self.last_rows, self.best_rows},
                            (self.store.rank, self.store.world))

    def restore(self, path: str, device: torch.device) -> tuple[int, int]:
        """Load model, head, optimizer, sampler RNG and rows; returns ``(step, epoch)``."""
        ckpt = load_checkpoint(path, map_location=device)
        self.backbone.load_state_dict(ckpt["model"])
        self.head.load_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.precision is not None:
            self.precision.load_state_dict(ckpt.get("scaler"))
        state = (ckpt.get("rng") or {}).get("sampler")
        rng = getattr(getattr(self.head, "sampler", None), "rng", None)
        if state and rng is not None:
            rng.bit_generator.state = json.loads(state)
        self.best = ckpt["best"] if ckpt.get("best") is not None else -math.inf
        best_path = os.path.join(self.folder, "best.pth")
        if os.path.isfile(best_path) and os.path.abspath(path) != best_path:
            self.best_rows = load_checkpoint(best_path).get("ps_snapshot")
        rows = ckpt.get("ps_snapshot")
        if ckpt.get("ps_kind") == "dist" and self.store is not None and not self.sharded:
            logger.warning("--resume %s: its rows were sharded over the ranks (--row-store "
                           "dist); this run keeps all of them in every process. Add "
                           "--row-store dist to keep sharding them", path)
        if self.store is not None:
            if rows is None:
                raise ValueError(f"--resume {path} has no row-store snapshot (was it trained "
                                 "without --sampled?)")
            # Every store reads the parameter server's snapshot format, so a run may resume
            # with or without --ps. The remote store is shared: rank 0 restores it; sharded
            # rows: every rank its own file of them (another count: paramserver.reshard).
            if self.remote:
                # a server reads names inside its snapshot folder (older checkpoints stored
                # an absolute path: its file name, for a server started in the run folder)
                rows = os.path.basename(rows) if os.path.isabs(rows) else rows
                if hd.is_main():
                    self.store.restore(rows)
            else:
                self.store.restore(rows_path_beside(path, rows))
                rows = os.path.basename(rows) if os.path.isabs(rows) else rows
            hd.barrier()
            self.last_rows = rows
        logger.info("resumed from %s at step %d (rows: %s)", path, ckpt["step"], rows)
        return int(ckpt["step"]), int(ckpt.get("epoch", 0))
