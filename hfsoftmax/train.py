"""Train a face-embedding backbone with a full softmax or with HF-Softmax.

``python -m hfsoftmax.train --help`` (console entry ``hfsoftmax-train``) lists every flag;
they are defined in :mod:`hfsoftmax.engine.config`. Launch several processes with
``torchrun --nproc_per_node N -m hfsoftmax.train ...``.

The loop is plain (torchvision's ``train_one_epoch``): per step, load a batch, compute the
embeddings (DDP over the ranks), the head's loss, backward, one SGD step of the backbone
(and of the full head's weight). The sampled head's rows are not trainer parameters: its
backward pushes their gradients to the row store, whose SGD updates them: the same weight
decay and LR schedule (through ``head.set_lr``), by default without lazy momentum at LR x
``1/(1 - momentum)`` (``--row-momentum``, ``--row-lr-mult``; see :func:`row_lr_mult`).

Distributed: every rank is a parameter-server worker (``worker_id = rank``); the sampled
head selects classes over the gathered global batch on rank 0 and broadcasts them, so W
ranks at batch B train exactly like one process at batch W*B (for a batch-independent
backbone: BatchNorm's statistics are per rank). Outputs in ``--save-path``: ``last.pth``
and ``best.pth`` (checkpoints), ``rows_step*.safetensors`` (the row store at the
checkpoint's step), ``train.log``, ``metrics.csv``, ``val.csv`` and TensorBoard events in
``tb/``.

>>> python -m hfsoftmax.train --train-rec datasets/data/synthetic --arch convnet-s \\
...     --sampled --sampler hnsw --sample-num 500 --max-steps 300 --save-path runs/demo
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed as hd
from .engine.checkpoint import (load_checkpoint, prune_row_snapshots, rows_snapshot_name,
                                save_checkpoint)
from .engine.config import (FRESH_ROWS_AUTO_MAX, args_to_dict, parse_args, parse_key_values,
                            resolve_resume_path)
from .engine.data import FlipDataset, ShardedBatchSampler, build_train_dataset
from .engine.metrics import CsvWriter, ScalarWriter, SmoothedValue, format_eta
from .engine.schedule import StepSchedule
from .fileio import write_json
from .samplers.selection import neighbour_slots

__all__ = ["main", "run", "TrainModel", "train_one_epoch"]

logger = logging.getLogger("hfsoftmax.train")

TRAIN_FIELDS = ["step", "epoch", "loss", "acc", "lr", "img_s", "data_s", "step_s", "recall",
                "rebuild_s", "select_s", "pull_s", "push_s"]
VAL_FIELDS = ["step", "epoch", "name", "acc", "acc_std", "threshold", "val_far", "mean_acc"]


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


# --------------------------------------------------------------------------- setup
def setup_logging(save_path: str, rank: int) -> list[logging.Handler]:
    """Console and ``train.log`` handlers on rank 0; warnings only on the other ranks.

    Returns the handlers added to the root logger (``main`` removes them when it ends).
    """
    root = logging.getLogger()
    if rank == 0:
        root.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                datefmt="%H:%M:%S")
        handlers: list[logging.Handler] = [
            logging.StreamHandler(sys.stderr),
            logging.FileHandler(os.path.join(save_path, "train.log"), encoding="utf-8")]
    else:
        root.setLevel(logging.WARNING)
        fmt = logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
        handlers = [logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    return handlers


def pick_device(name: str) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", hd.local_rank()) if torch.cuda.is_available() \
            else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use "
                             "--device cpu (or auto)")
        if dev.index is None:
            dev = torch.device("cuda", hd.local_rank())
    return dev


def row_momentum(args: argparse.Namespace) -> float:
    """The sampled head's rows' momentum: ``--row-momentum``, else 0 (no lazy momentum)."""
    return 0.0 if args.row_momentum is None else args.row_momentum


# The margin heads' logits ignore row norms; for them, by default, the sampled rows are
# decayed every step (as under the full softmax) and capped at norm 1, and the rows changed
# since the last rebuild are searched beside the index: the accuracy benchmark needed these
# (benchmarks/ACCURACY.md: the cap with the every-step decay met its target at 3 and 12
# epochs; the older default, rows renormed to 1, stays where the decay is lazy). The linear
# head keeps all off: its logits scale with the norms, and an inner-product index may not
# score fresh rows alike.
MARGIN_HEADS = ("cosface", "arcface")


def _sampled_margin(args: argparse.Namespace) -> bool:
    return bool(args.sampled) and args.head in MARGIN_HEADS


def row_catchup_decay(args: argparse.Namespace) -> bool:
    """Whether every row is decayed every step: ``--[no-]row-catchup-decay``, else on for a
    sampled margin head whose rows take no momentum (and ``lr * weight decay < 1``)."""
    if args.row_catchup_decay is not None:
        return bool(args.row_catchup_decay)
    try:
        row_lr = args.lr * row_lr_mult(args)
    except ValueError:  # no default LR multiplier: row_lr_mult's error comes later
        return False
    return _sampled_margin(args) and row_momentum(args) == 0 and row_lr * args.weight_decay < 1


def max_norm_rows(args: argparse.Namespace) -> float:
    """The norm the sampled head's updated rows are capped at (0: off): ``--max-norm-rows``,
    else off beside a ``--renorm-rows``, else 1 for a margin head with every-step decay."""
    if args.max_norm_rows is not None:
        return args.max_norm_rows
    if args.renorm_rows:
        return 0.0
    return 1.0 if _sampled_margin(args) and row_catchup_decay(args) else 0.0


def renorm_rows(args: argparse.Namespace) -> float:
    """The norm the sampled head's updated rows are rescaled to (0: off): ``--renorm-rows``,
    else off beside a ``--max-norm-rows``, else 1 for a margin head whose weight decay is
    lazy (the rows then grow without it)."""
    if args.renorm_rows is not None:
        return args.renorm_rows
    if args.max_norm_rows:
        return 0.0
    return 1.0 if _sampled_margin(args) and not row_catchup_decay(args) else 0.0


def _selects_by_index(args: argparse.Namespace) -> bool:
    """Whether the run's classes come from an index (a sampled head, not ``random``)."""
    return args.sampled and args.sampler != "random"


def _auto_fresh_rows(args: argparse.Namespace) -> int:
    """The rows one rebuild interval can change (``--interval`` x ``--sample-num``) for a
    sampled margin head with an index (not ``random``); 0 where fresh rows do not apply."""
    if _selects_by_index(args) and args.head in MARGIN_HEADS:
        return args.interval * args.sample_num
    return 0


def neighbour_slots_per_sample(args: argparse.Namespace, world: int = 1) -> float | None:
    """Nearest-class slots per sample of one step of a sampled head with an index: the
    ``--sample-num`` classes less the (global) batch's labels, less the ``--random-share``,
    over the global batch; the least it can be (every label of the batch distinct). None for
    full softmax and ``random``.

    It bounds how many of a sample's hardest negatives each step can hold: the selection
    gives every sample its 1st neighbour, then every sample its 2nd, ... (``selection.py``).
    """
    if not _selects_by_index(args):
        return None
    batch = args.batch_size * max(1, int(world))
    return neighbour_slots(args.sample_num, batch, args.random_share) / batch


def fresh_rows(args: argparse.Namespace) -> int:
    """How many changed rows the sampler searches beside its index: ``--fresh-rows``, else
    the automatic size (so the store never fills and forces an early rebuild) where that is
    at most ``FRESH_ROWS_AUTO_MAX``, else 0."""
    if args.fresh_rows is not None:
        return args.fresh_rows
    auto = _auto_fresh_rows(args)
    return auto if auto <= FRESH_ROWS_AUTO_MAX else 0


def row_lr_mult(args: argparse.Namespace) -> float:
    """The rows' LR over the backbone's: ``--row-lr-mult``, else ``(1 - row momentum) /
    (1 - momentum)``, which gives a row gradient the total displacement ``lr * g / (1 -
    momentum)`` that momentum SGD gives it (10 for momentum 0.9 and row momentum 0)."""
    if args.row_lr_mult is not None:
        return args.row_lr_mult
    if args.momentum >= 1:
        raise ValueError(f"--momentum {args.momentum} >= 1 leaves the rows' default LR "
                         "multiplier (1 - row momentum) / (1 - momentum) undefined; give "
                         "--row-lr-mult")
    return (1.0 - row_momentum(args)) / (1.0 - args.momentum)


def stored_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a checkpoint keeps: the flags as given, with the sampled head's row rule
    (momentum, LR multiplier, renorm, cap, decay) and its per-sample log-Q correction
    resolved to the values it ran with, so that a later change of a default does not change
    a resumed run.
    (Checkpoints written before this store ``None`` for defaults; ``config._stored_args``
    reads those as today's defaults.)"""
    out = args_to_dict(args)
    if args.sampled:
        out.update(row_momentum=row_momentum(args), row_lr_mult=row_lr_mult(args),
                   renorm_rows=renorm_rows(args), max_norm_rows=max_norm_rows(args),
                   row_catchup_decay=row_catchup_decay(args),
                   logq_per_sample=logq_per_sample(args))
    return out


def logq_per_sample(args: argparse.Namespace) -> bool:
    """Whether the sampled head corrects its softmax per sample: ``--logq-per-sample``, else
    on for a margin head selecting by index unless ``--logq-correction`` asks for the random
    top-up's correction. Measured at 1% of 20K classes (benchmarks/ACCURACY.md): above the
    paper's rule and the mix at 3 and 12 epochs; the linear head and the ``random`` sampler
    (Partial FC's rule, the benchmark's baseline) keep it off."""
    if args.logq_per_sample is not None:
        return bool(args.logq_per_sample)
    return _selects_by_index(args) and args.head in MARGIN_HEADS and not args.logq_correction


def logq_mode(args: argparse.Namespace) -> bool | str:
    """The sampled head's ``logq``: "sample" (:func:`logq_per_sample`), True
    (``--logq-correction``: the random top-up's) or False."""
    return "sample" if logq_per_sample(args) else bool(args.logq_correction)


def build_row_store(args: argparse.Namespace, num_classes: int, rank: int):
    """The sampled head's rows: in this process, or on the parameter server(s) of ``--ps``."""
    from .rowstore import LocalRowStore, RemoteRowStore, SGDConfig

    sgd = SGDConfig(lr=args.lr * row_lr_mult(args), momentum=row_momentum(args),
                    weight_decay=args.weight_decay, renorm=renorm_rows(args),
                    max_norm=max_norm_rows(args), catchup_decay=row_catchup_decay(args))
    if not args.ps:
        return LocalRowStore(num_classes, args.embedding_size, sgd, seed=args.seed)
    from paramserver import ParamClient

    client = ParamClient(args.ps, worker_id=rank, timeout_s=args.ps_timeout)
    try:
        status = client.ping()
    except Exception as e:
        client.close()
        raise RuntimeError(f"no parameter server answers at {','.join(args.ps)}: {e}. Start "
                           "one with `python paramserver/paramserver.py --bind "
                           f"{args.ps[0]} --workers {hd.world_size()}`") from None
    world = hd.world_size()
    expected = set(status[0].get("workers", []) or [])
    if expected and max(expected) >= world:
        client.close()
        raise RuntimeError(f"the parameter server waits for workers {sorted(expected)} but "
                           f"this run has {world} process(es); restart it with --workers "
                           f"{world}")
    store = RemoteRowStore(client, args.ps_table, num_classes, args.embedding_size, sgd,
                           seed=args.seed, own_client=True)
    client.register()  # every step now waits for this rank's push
    return store


def build_head(args: argparse.Namespace, num_classes: int, rank: int):
    """``(head, row store or None)`` for ``--head`` / ``--sampled``."""
    from .heads import FullHead, SampledHead

    kw: dict[str, Any] = {"logit": args.head}
    if args.scale is not None:
        kw["s"] = args.scale
    if args.margin is not None:
        kw["m"] = args.margin
    if not args.sampled:
        row_flags = {"--renorm-rows": args.renorm_rows or None,
                     "--max-norm-rows": args.max_norm_rows or None,
                     "--row-momentum": args.row_momentum,
                     "--row-lr-mult": args.row_lr_mult,
                     "--row-catchup-decay": args.row_catchup_decay or None}
        for flag, value in row_flags.items():
            if value is not None:
                raise ValueError(f"{flag} {value} applies to the sampled head's row store (the "
                                 "full head's rows are torch parameters, updated with the "
                                 "backbone's --lr and --momentum); add --sampled or drop it")
        if args.logq_correction or args.logq_per_sample:
            flag = "--logq-per-sample" if args.logq_per_sample else "--logq-correction"
            raise ValueError(f"{flag} corrects the sampled head's softmax for the "
                             "classes a selection leaves out; the full head leaves none out: "
                             "add --sampled or drop it")
        return FullHead(num_classes, args.embedding_size, **kw), None
    if args.sample_num > num_classes:
        raise ValueError(f"--sample-num {args.sample_num} exceeds the {num_classes} classes of "
                         "the data; lower --sample-num")
    global_batch = args.batch_size * hd.world_size()
    if args.sample_num < min(global_batch, num_classes):
        raise ValueError(f"--sample-num {args.sample_num} is smaller than the global batch "
                         f"({args.batch_size} x {hd.world_size()} processes = {global_batch}): "
                         "a batch's own labels alone may not fit; raise --sample-num or lower "
                         "--batch-size")
    for flag, value in (("--renorm-rows", args.renorm_rows),
                        ("--max-norm-rows", args.max_norm_rows)):
        if value and args.head == "linear":
            raise ValueError(f"{flag} {value} would change the linear head's logits (they "
                             "scale with the row norms); use it with --head cosface or "
                             "arcface, or drop it")
    if args.renorm_rows and args.max_norm_rows:
        raise ValueError(f"--renorm-rows {args.renorm_rows} sets every updated row to that "
                         f"norm, --max-norm-rows {args.max_norm_rows} only caps them: give "
                         "one of them")
    from .samplers import build_sampler

    opts: dict[str, Any] = {"interval": args.interval, "background": args.background_rebuild,
                            "random_share": args.random_share, "fresh_rows": fresh_rows(args)}
    if args.sampler == "annoy":
        opts["ntrees"] = args.ntrees
    extra = parse_key_values(args.sampler_opt)
    clash = sorted(set(extra) & set(opts) | set(extra) & {"metric", "seed", "process"})
    if clash:
        raise ValueError(f"--sampler-opt {', '.join(clash)}: set by the trainer's own flags "
                         "(--interval, --ntrees, --fresh-rows, --random-share, "
                         "--background-rebuild, --head, --seed); use those")
    opts.update(extra)
    # Only rank 0 selects (over the global batch), so only rank 0 needs an index process.
    process = args.sampler_process if args.sampler_process is not None else bool(args.ps)
    if args.index_threads:
        if not process:
            raise ValueError(f"--index-threads {args.index_threads} applies to the index "
                             "process only; add --sampler-process (an in-process index uses "
                             "the trainer's --threads)")
        if rank == 0:
            opts["threads"] = args.index_threads
    try:
        sampler = build_sampler(args.sampler, num_classes, args.embedding_size,
                                metric="ip" if args.head == "linear" else "cosine",
                                seed=args.seed, process=process and rank == 0, **opts)
    except TypeError as exc:  # an option the backend does not take
        if not extra:
            raise
        raise ValueError(f"--sampler-opt {', '.join(sorted(extra))}: not an option of the "
                         f"{args.sampler} sampler ({exc}); see hfsoftmax/samplers/README.md "
                         "for each backend's options") from None
    store = build_row_store(args, num_classes, rank)
    head = SampledHead(store, sampler, args.sample_num, interval=args.interval,
                       recall_every=args.recall_every, logq=logq_mode(args), **kw)
    return head, store


def _sampler_rng_state(head) -> str | None:
    sampler = getattr(head, "sampler", None)
    rng = getattr(sampler, "rng", None)
    return json.dumps(rng.bit_generator.state) if rng is not None else None


def _set_sampler_rng_state(head, state: str | None) -> None:
    sampler = getattr(head, "sampler", None)
    if state and getattr(sampler, "rng", None) is not None:
        sampler.rng.bit_generator.state = json.loads(state)


# --------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Writes ``last.pth`` / ``best.pth`` and the row snapshot of the same step (rank 0)."""

    def __init__(self, args, backbone, head, store, optimizer, schedule):
        self.args, self.backbone, self.head, self.store = args, backbone, head, store
        self.optimizer, self.schedule = optimizer, schedule
        self.best = -math.inf
        self.last_rows: str | None = None
        self.best_rows: str | None = None

    def state(self, step: int, epoch: int, rows: str | None) -> dict:
        return {"model": self.backbone.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.schedule.state_dict(), "step": step, "epoch": epoch,
                "args": stored_settings(self.args), "ps_snapshot": rows,
                "ps_kind": None if self.store is None else ("remote" if self.args.ps
                                                            else "local"),
                "rng": {"sampler": _sampler_rng_state(self.head)},
                "best": self.best if math.isfinite(self.best) else None}

    def save(self, step: int, epoch: int, is_best: bool = False) -> None:
        # Every rank has pushed this step's rows (a push returns once the step is applied
        # for all workers), so rank 0's snapshot is the rows after exactly `step` steps.
        if not hd.is_main():
            return
        folder = os.path.abspath(self.args.save_path)
        rows = None
        if self.store is not None:
            rows = os.path.join(folder, rows_snapshot_name(step))
            if rows != self.last_rows:
                self.store.snapshot(rows)
        state = self.state(step, epoch, rows)
        save_checkpoint(os.path.join(folder, "last.pth"), state)
        self.last_rows = rows
        if is_best:
            save_checkpoint(os.path.join(folder, "best.pth"), state)
            self.best_rows = rows
        if self.store is not None:
            prune_row_snapshots(folder, {self.last_rows, self.best_rows})

    def restore(self, path: str, device: torch.device) -> tuple[int, int]:
        """Load model, head, optimizer, sampler RNG and rows; returns ``(step, epoch)``."""
        ckpt = load_checkpoint(path, map_location=device)
        self.backbone.load_state_dict(ckpt["model"])
        self.head.load_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        _set_sampler_rng_state(self.head, (ckpt.get("rng") or {}).get("sampler"))
        self.best = ckpt["best"] if ckpt.get("best") is not None else -math.inf
        best_path = os.path.join(self.args.save_path, "best.pth")
        if os.path.isfile(best_path):  # keep the rows best.pth names when pruning
            self.best_rows = load_checkpoint(best_path).get("ps_snapshot")
        rows = ckpt.get("ps_snapshot")
        if self.store is not None:
            if rows is None:
                raise ValueError(f"--resume {path} has no row-store snapshot (was it trained "
                                 "without --sampled?)")
            # Both stores read the parameter server's snapshot format, so a run may resume
            # with or without --ps. The remote store is shared: rank 0 restores it.
            if not self.args.ps or hd.is_main():
                self.store.restore(rows)
            hd.barrier()
            self.last_rows = rows
        logger.info("resumed from %s at step %d (rows: %s)", path, ckpt["step"], rows)
        return int(ckpt["step"]), int(ckpt.get("epoch", 0))


# --------------------------------------------------------------------------- evaluation
class Verifier:
    """Periodic verification on ``--val-bins`` (rank 0): the pair sets are decoded once, each
    call runs :func:`hfsoftmax.eval.evaluate_model` and writes JSON + ROC PNG per set into
    ``<save-path>/val/``."""

    def __init__(self, bin_paths: Sequence[str], out_dir: str):
        from .extract import load_verification_set

        missing = [p for p in bin_paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"--val-bins file(s) not found: {', '.join(missing)}")
        self.sets = [load_verification_set(p) for p in bin_paths]
        self.out_dir = out_dir

    def __call__(self, backbone: nn.Module, device: torch.device, step: int) -> dict:
        from .eval import evaluate_model

        return evaluate_model(backbone, self.sets, device=device, out_dir=self.out_dir,
                              report_extra={"step": step})


# --------------------------------------------------------------------------- the loop
def train_one_epoch(model: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer,
                    loader, device: torch.device, epoch: int, step: int, total_steps: int,
                    schedule: StepSchedule, args: argparse.Namespace, writers: dict,
                    on_step) -> int:
    """Train until the epoch ends or ``total_steps`` is reached; returns the next step.

    ``on_step(step, epoch, end_of_epoch)`` runs after each step (checkpoints, validation).
    """
    model.train()
    meters = {k: SmoothedValue(args.print_freq) for k in ("loss", "acc", "data_s", "step_s")}
    sums = torch.zeros(3, dtype=torch.float64)          # loss sum, correct, count since log
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
                head.set_lr(lr * row_lr_mult(args))
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

        correct = float((out.logits.detach().argmax(1) == out.target).sum())
        n = labels.shape[0]
        sums += torch.tensor([loss_value * n, correct, n], dtype=torch.float64)
        meters["loss"].update(loss_value)
        meters["acc"].update(correct / n)
        meters["data_s"].update(t_data)
        step += 1
        t_now = time.perf_counter()
        meters["step_s"].update(t_now - t_end)
        t_end = t_now

        if step % args.print_freq == 0 or step == total_steps or i + 1 == steps_in_epoch:
            # The global batch's figures (on the device: NCCL reduces only CUDA tensors).
            tot = hd.all_reduce_mean(sums.to(device)).cpu() * hd.world_size()
            sums.zero_()
            g_loss, g_acc = float(tot[0] / tot[2]), float(tot[1] / tot[2])
            step_s = meters["step_s"].avg
            img_s = n * hd.world_size() / step_s if step_s > 0 else math.nan
            eta = format_eta(step_s * (total_steps - step))
            tel = head.stats() if hasattr(head, "stats") else {}
            extra = ""
            if tel.get("recall") is not None:
                extra += f"  recall {tel['recall']:.3f}"
            if tel.get("rebuild_s") is not None:
                extra += f"  rebuild {tel['rebuild_s']:.2f}s"
            logger.info("epoch %d [%d/%d] step %d/%d  eta %s  lr %.5g  loss %.4f  acc %.3f  "
                        "%.1f img/s  data %.3fs%s", epoch, i + 1, steps_in_epoch, step,
                        total_steps, eta, lr, g_loss, g_acc, img_s, meters["data_s"].avg,
                        extra)
            if hd.is_main():
                row = {"step": step, "epoch": epoch, "loss": g_loss, "acc": g_acc, "lr": lr,
                       "img_s": img_s, "data_s": meters["data_s"].avg, "step_s": step_s,
                       "recall": tel.get("recall"), "rebuild_s": tel.get("rebuild_s"),
                       "select_s": tel.get("select_s"), "pull_s": tel.get("pull_s"),
                       "push_s": tel.get("push_s")}
                writers["csv"].write(row)
                writers["tb"].add({"train/loss": g_loss, "train/acc": g_acc, "train/lr": lr,
                                   "train/img_per_s": img_s,
                                   "train/data_s": meters["data_s"].avg,
                                   "sampler/recall": tel.get("recall"),
                                   "sampler/rebuild_s": tel.get("rebuild_s"),
                                   "sampler/select_s": tel.get("select_s"),
                                   "sampler/pull_s": tel.get("pull_s"),
                                   "sampler/push_s": tel.get("push_s")}, step)
        on_step(step, epoch, i + 1 == steps_in_epoch)
        t_end = time.perf_counter()  # checkpoint/validation time is not data time
    return step


def run(args: argparse.Namespace) -> dict:
    """Train with parsed ``args``; returns a summary (steps, last figures, paths)."""
    rank, world = hd.rank(), hd.world_size()
    device = pick_device(args.device)
    os.makedirs(args.save_path, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    dataset = build_train_dataset(args)
    num_classes = args.num_classes or dataset.num_classes
    if num_classes < dataset.num_classes:
        raise ValueError(f"--num-classes {num_classes} is smaller than the data's "
                         f"{dataset.num_classes} classes")
    args.num_classes = int(num_classes)
    batches = ShardedBatchSampler(len(dataset), args.batch_size, rank, world, args.seed,
                                  flip=args.augment)
    steps_per_epoch = batches.batches_per_epoch
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    loader = torch.utils.data.DataLoader(FlipDataset(dataset), batch_sampler=batches,
                                         num_workers=args.workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=False)

    from .models import build_backbone

    backbone = build_backbone(args.arch, args.embedding_size).to(device)
    head, store = build_head(args, num_classes, rank)
    head = head.to(device)
    model = TrainModel(backbone, head, amp=args.amp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    schedule = StepSchedule.from_epochs(args.lr, args.lr_steps, steps_per_epoch, args.gamma,
                                        args.warmup_steps)
    ckpt = Checkpointer(args, backbone, head, store, optimizer, schedule)
    step = 0
    if args.resume:
        step, _ = ckpt.restore(resolve_resume_path(args.resume), device)
    elif store is not None and args.ps:
        tstep = store.info().get("step", 0)
        if tstep:
            raise RuntimeError(f"the parameter server's table {args.ps_table!r} has already "
                               f"taken {tstep} steps (an earlier run?); pass --resume, a new "
                               "--ps-table name, or restart the server")
    hd.barrier()  # every rank registered with the server before anyone pushes
    if world > 1:
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kw)

    writers = {"csv": None, "tb": None, "val": None}
    if hd.is_main():
        writers["csv"] = CsvWriter(os.path.join(args.save_path, "metrics.csv"), TRAIN_FIELDS)
        writers["val"] = CsvWriter(os.path.join(args.save_path, "val.csv"), VAL_FIELDS)
        writers["tb"] = ScalarWriter(os.path.join(args.save_path, "tb"))
        write_json(os.path.join(args.save_path, "args.json"), stored_settings(args), indent=2,
                   sort_keys=True)
    verifier = Verifier(args.val_bins, os.path.join(args.save_path, "val")) \
        if args.val_bins and hd.is_main() else None
    if store is not None:
        logger.info("class rows: SGD lr x%g, momentum %g, weight decay %g (%s), renorm %s, "
                    "max norm %s; fresh rows %d; log-Q correction %s", row_lr_mult(args),
                    row_momentum(args), args.weight_decay,
                    "every step" if row_catchup_decay(args) else "lazy",
                    renorm_rows(args) or "off", max_norm_rows(args) or "off", fresh_rows(args),
                    {"sample": "per sample", True: "of the random classes",
                     False: "off"}[logq_mode(args)])
        slots = neighbour_slots_per_sample(args, world)
        if slots is not None:
            logger.info("class selection: %d of %d classes per step (%.2f%%); after the "
                        "batch's labels, %.1f slots per sample for its nearest classes",
                        args.sample_num, num_classes, 100.0 * args.sample_num / num_classes,
                        slots)
        if logq_mode(args) is True and _selects_by_index(args) and not args.random_share:
            logger.warning("--logq-correction acts on random classes only, and with "
                           "--random-share 0 a selection has some only before the first "
                           "index (or where the index finds too few neighbours); add "
                           "--random-share, e.g. 0.3")
        auto = _auto_fresh_rows(args)
        if args.fresh_rows is None and auto > FRESH_ROWS_AUTO_MAX:
            logger.info("fresh rows off: --interval x --sample-num = %d rows is above the "
                        "automatic limit of %d (each step searches them exactly); "
                        "--fresh-rows N turns them on", auto, FRESH_ROWS_AUTO_MAX)
    logger.info("training %s (%s head%s) on %d images of %d classes: %d process(es) x batch "
                "%d, %d steps/epoch, steps %d -> %d, device %s", args.arch, args.head,
                f", sampled {args.sample_num} via {args.sampler}"
                f"{' on ' + ','.join(args.ps) if args.ps else ' (in-process rows)'}"
                if args.sampled else ", full softmax", len(dataset), num_classes, world,
                args.batch_size, steps_per_epoch, step, total_steps, device)

    summary: dict[str, Any] = {"val": {}}

    def on_step(s: int, epoch: int, end_of_epoch: bool) -> None:
        done = s >= total_steps
        is_best = False
        want_val = args.val_bins and ((args.val_every and s % args.val_every == 0)
                                      or (not args.val_every and end_of_epoch) or done)
        if want_val:
            if hd.is_main():
                results = verifier(backbone, device, s)
                for name, r in results.items():
                    writers["val"].write({"step": s, "epoch": epoch, "name": name,
                                          "acc": r.accuracy, "acc_std": r.accuracy_std,
                                          "threshold": r.best_threshold, "val_far": r.val})
                    writers["tb"].add({f"val/{name}_acc": r.accuracy,
                                       f"val/{name}_val_far": r.val}, s)
                mean = float(np.mean([r.accuracy for r in results.values()]))
                writers["val"].write({"step": s, "epoch": epoch, "name": "mean",
                                      "mean_acc": mean})
                is_best = mean > ckpt.best
                ckpt.best = max(ckpt.best, mean)
                summary["val"] = {n: r.accuracy for n, r in results.items()}
                logger.info("step %d verification: %s (mean %.4f, best %.4f)", s,
                            ", ".join(f"{k} {v:.4f}" for k, v in summary["val"].items()),
                            mean, ckpt.best)
            hd.barrier()
        want_save = done or is_best or (args.save_every and s % args.save_every == 0) \
            or (not args.save_every and end_of_epoch)
        if want_save:
            ckpt.save(s, s // steps_per_epoch, is_best=is_best)

    t0 = time.perf_counter()
    start_step = step
    try:
        for epoch in range(step // steps_per_epoch, num_epochs):
            batches.set_epoch(epoch, step - epoch * steps_per_epoch)
            step = train_one_epoch(model, head, optimizer, loader, device, epoch, step,
                                   total_steps, schedule, args, writers, on_step)
            if step >= total_steps:
                break
    finally:
        for w in writers.values():
            if w is not None:
                w.close()
        sampler = getattr(head, "sampler", None)
        if sampler is not None and hasattr(sampler, "close"):
            sampler.close()
        if store is not None:
            store.close()
    elapsed = time.perf_counter() - t0
    summary.update({"steps": step, "start_step": start_step, "seconds": elapsed,
                    "save_path": os.path.abspath(args.save_path),
                    "checkpoint": os.path.abspath(os.path.join(args.save_path, "last.pth")),
                    "best": ckpt.best if math.isfinite(ckpt.best) else None})
    logger.info("done: %d steps in %.1f s; checkpoint %s", step - start_step, elapsed,
                summary["checkpoint"])
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``hfsoftmax-train``; returns the exit status."""
    try:
        args = parse_args(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"hfsoftmax-train: error: {e}", file=sys.stderr)
        return 2
    rank, _ = hd.init_distributed(args.dist_backend)
    handlers: list[logging.Handler] = []
    try:
        os.makedirs(args.save_path, exist_ok=True)
        handlers = setup_logging(args.save_path, rank)
        run(args)
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()
        hd.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
