"""Progress metrics: smoothed values, the progress line, and CSV/TensorBoard writers.

In the spirit of torchvision's ``references/classification/utils.py`` (``SmoothedValue``,
``MetricLogger``): the loop updates meters every step and logs one line every
``--print-freq`` steps; only rank 0 writes files.
"""
from __future__ import annotations

import csv
import datetime
import logging
import math
import os
from collections import deque

__all__ = ["SmoothedValue", "format_eta", "CsvWriter", "ScalarWriter", "ProgressLog",
           "TRAIN_FIELDS", "VAL_FIELDS", "log_start"]

logger = logging.getLogger("hfsoftmax.train")  # the progress line is the trainer's


class SmoothedValue:
    """A window of recent values plus the running total."""

    def __init__(self, window: int = 20):
        self.values: deque[float] = deque(maxlen=window)
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(float(value))
        self.total += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        """Mean over the window (nan when empty)."""
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def global_avg(self) -> float:
        """Mean over everything seen."""
        return self.total / self.count if self.count else math.nan


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (or ``?`` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class CsvWriter:
    """Appends rows with a fixed header to ``path`` (the header once, also across resumes)."""

    def __init__(self, path: str, fields: list[str]):
        self.path, self.fields = path, fields
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self._f = open(path, "a", newline="", encoding="utf-8")
        self._w = csv.DictWriter(self._f, fieldnames=fields, extrasaction="ignore")
        if new:
            self._w.writeheader()

    def write(self, row: dict) -> None:
        self._w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ScalarWriter:
    """TensorBoard scalars (``torch.utils.tensorboard``); a no-op with a warning when the
    ``tensorboard`` package is missing."""

    def __init__(self, log_dir: str):
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed (pip install tensorboard): no "
                           "TensorBoard scalars will be written")
            return
        self._tb = SummaryWriter(log_dir=log_dir)

    def add(self, scalars: dict, step: int) -> None:
        if self._tb is None:
            return
        for k, v in scalars.items():
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


TRAIN_FIELDS = ["step", "epoch", "loss", "acc", "lr", "img_s", "data_s", "step_s", "recall",
                "top1_all", "coverage", "picks_top1pct", "rebuild_s", "select_s", "pull_s",
                "push_s"]
VAL_FIELDS = ["step", "epoch", "name", "acc", "acc_std", "threshold", "val_far", "mean_acc"]
_SAMPLER_KEYS = ("recall", "top1_all", "rebuild_s", "select_s", "pull_s", "push_s")


class ProgressLog:
    """Where the loop's figures go: the progress line (every rank logs, rank 0's handlers
    print), and on rank 0 ``metrics.csv``, ``val.csv`` and TensorBoard under ``folder``."""

    def __init__(self, folder: str | None):
        self.csv = self.val_csv = self.tb = None
        if folder is not None:
            self.csv = CsvWriter(os.path.join(folder, "metrics.csv"), TRAIN_FIELDS)
            self.val_csv = CsvWriter(os.path.join(folder, "val.csv"), VAL_FIELDS)
            self.tb = ScalarWriter(os.path.join(folder, "tb"))

    def train(self, row: dict, where: str, eta: str, tel: dict) -> None:
        """One progress line from ``row`` (``TRAIN_FIELDS`` without the telemetry) and the
        head's telemetry ``tel``; ``where`` is ``epoch E [i/n] step s/total``. ``acc`` is the
        batch accuracy without the margin, over the head's columns: a sampled head's says
        so (``acc(sampled)``) and shows its latest top-1 over all classes beside it."""
        sampled = "select_s" in tel
        extra = ""
        if tel.get("top1_all") is not None:
            extra += f"  top1(all) {tel['top1_all']:.3f}"
        if tel.get("recall") is not None:
            extra += f"  recall {tel['recall']:.3f}"
        if tel.get("rebuild_s") is not None:
            extra += f"  rebuild {tel['rebuild_s']:.2f}s"
        if row.get("coverage") is not None:
            extra += (f"  epoch's negatives: {100 * row['coverage']:.1f}% of classes, top 1% "
                      f"of them {100 * (row['picks_top1pct'] or 0):.1f}% of picks")
        logger.info("%s  eta %s  lr %.5g  loss %.4f  acc%s %.3f%s  %.1f img/s  data %.3fs",
                    where, eta, row["lr"], row["loss"], "(sampled)" if sampled else "",
                    row["acc"], extra, row["img_s"], row["data_s"])
        if self.csv is None:
            return
        full = {**row, **{k: tel.get(k) for k in _SAMPLER_KEYS}}
        self.csv.write(full)
        self.tb.add({"train/loss": row["loss"],
                     "train/acc_sampled" if "select_s" in tel else "train/acc": row["acc"],
                     "train/top1_all": tel.get("top1_all"), "train/lr": row["lr"],
                     "sampler/coverage": row.get("coverage"),
                     "sampler/picks_top1pct": row.get("picks_top1pct"),
                     "train/img_per_s": row["img_s"], "train/data_s": row["data_s"],
                     **{f"sampler/{k}": tel.get(k) for k in _SAMPLER_KEYS}}, row["step"])

    def val(self, step: int, epoch: int, results: dict) -> float:
        """Write one verification round (``{name: result}``); returns the mean accuracy."""
        for name, r in results.items():
            self.val_csv.write({"step": step, "epoch": epoch, "name": name, "acc": r.accuracy,
                                "acc_std": r.accuracy_std, "threshold": r.best_threshold,
                                "val_far": r.val})
            self.tb.add({f"val/{name}_acc": r.accuracy, f"val/{name}_val_far": r.val}, step)
        mean = sum(r.accuracy for r in results.values()) / max(len(results), 1)
        self.val_csv.write({"step": step, "epoch": epoch, "name": "mean", "mean_acc": mean})
        return mean

    def top1(self, step: int, epoch: int, name: str, value: float) -> None:
        """Write the held-out top-1 (``--val-filelist`` / ``--val-rec``) as a row ``name``
        of ``val.csv`` (its ``acc``) and the TensorBoard scalar ``val/<name>``."""
        if self.val_csv is None:
            return
        self.val_csv.write({"step": step, "epoch": epoch, "name": name, "acc": value})
        self.tb.add({f"val/{name}": value}, step)

    def close(self) -> None:
        for w in (self.csv, self.val_csv, self.tb):
            if w is not None:
                w.close()


def log_start(args, rule, num_images: int, num_classes: int, steps_per_epoch: int, step: int,
              total_steps: int, device, schedule) -> None:
    """The run's opening log lines: the sampled head's rule and selection size, what is
    trained on what (the head with its scale and margin), and the recipe (optimizer, LR
    schedule, precision, clipping, backward, loader, process group)."""
    from .. import distributed as hd
    from ..heads.factory import logit_kwargs, neighbour_slots_per_sample
    from ..heads.logits import DEFAULT_MARGINS, DEFAULT_SCALE

    world = hd.world_size()
    if rule is not None:
        logger.info("sampled head (--sampled-rule %s): %s", args.sampled_rule,
                    rule.describe(args.weight_decay))
        slots = neighbour_slots_per_sample(args, rule, world)
        if slots is not None:
            logger.info("class selection: %d of %d classes per step (%.2f%%); after the "
                        "batch's labels, %.1f slots per sample for its nearest classes",
                        args.sample_num, num_classes, 100.0 * args.sample_num / num_classes,
                        slots)
        per_interval = args.interval * args.sample_num
        if rule.fresh_rows and args.sampler not in ("random", "device") \
                and getattr(args, "row_store", None) != "dist" \
                and per_interval > rule.fresh_rows:  # (dist: the shards' copies, no index)
            logger.warning("fresh rows: up to %d rows change per interval (--interval %d x "
                           "--sample-num %d), more than the %d kept: the index will rebuild "
                           "early, about every %d steps; raise --fresh-rows, or set it to 0 "
                           "(no early rebuilds, a staler selection)", per_interval,
                           args.interval, args.sample_num, rule.fresh_rows,
                           max(1, rule.fresh_rows // args.sample_num))
        if rule.logq == "random" and args.sampler != "random" and not rule.random_share:
            logger.warning("--logq random acts on random classes only, and with "
                           "--random-share 0 a selection has some only before the first "
                           "index (or where the index finds too few neighbours); add "
                           "--random-share, e.g. 0.3")
    kw = logit_kwargs(args)
    head = args.head if args.head == "linear" else \
        f"{args.head} s={kw.get('s', DEFAULT_SCALE):g} m={kw.get('m', DEFAULT_MARGINS[args.head]):g}"
    rows = (" on " + ",".join(args.ps) if args.ps else " (rows sharded over the ranks)"
            if getattr(args, "row_store", None) == "dist" else " (in-process rows)")
    logger.info("training %s (%s head%s) on %d images of %d classes: %d process(es) x batch "
                "%d, %d steps/epoch, steps %d -> %d, device %s", args.arch, head,
                f", sampled {args.sample_num} via {args.sampler}{rows}"
                if args.sampled else ", full softmax", num_images, num_classes, world,
                args.batch_size, steps_per_epoch, step, total_steps, device)
    logger.info("recipe: %s, LR %g %s (warm-up %d steps%s), amp %s, clip %s, %s backward, "
                "%d loader workers (%s)", args.optimizer, args.lr, schedule.kind,
                schedule.warmup_steps, f", over {schedule.total_steps} steps"
                if schedule.kind != "step" else "", args.amp, args.clip_grad_norm or "off",
                "split" if args.split_backward else "fused", args.workers, args.decoder)
    if world > 1:
        import torch.distributed as dist

        logger.info("process group: %d ranks (%s, timeout %gs)", world, dist.get_backend(),
                    args.dist_timeout)
    if schedule.kind != "step" and total_steps < schedule.total_steps:
        logger.warning("the %s schedule spans --epochs %d (%d steps); this run stops at step "
                       "%d, before its end (resume with a larger --max-steps to go on)",
                       schedule.kind, args.epochs, schedule.total_steps, total_steps)
