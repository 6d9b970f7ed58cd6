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

__all__ = ["SmoothedValue", "format_eta", "CsvWriter", "ScalarWriter"]

logger = logging.getLogger(__name__)


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
