"""argparse value types shared by the trainer's flags (:mod:`hfsoftmax.engine.flags`) and
the sampled head's rule (:mod:`hfsoftmax.heads.sampled_config`): each parses one string and
raises ``argparse.ArgumentTypeError`` naming the value and what was expected."""
from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "nonneg_int", "nonneg_float", "positive_float", "unit_float"]


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def nonneg_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def unit_float(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {s}")
    return v
