"""Uniform random negatives: InsightFace Partial FC's rule (the baseline).

Every batch label plus ``sample_num - n_labels`` classes drawn uniformly without replacement
(An et al., "Partial FC", ICCVW 2021): a :class:`~hfsoftmax.samplers.selector.ClassSampler`
without an index, so ``maybe_rebuild`` does nothing and ``query`` is refused.
"""
from __future__ import annotations

from .index import MIPS
from .selector import ClassSampler

__all__ = ["RandomSampler"]


class RandomSampler(ClassSampler):
    """Labels + uniform random classes; never builds an index. Takes the options every
    sampler takes (``interval``, ``fresh_rows``, ``mips``, ...) and has no use for them."""

    def __init__(self, num_classes: int, dim: int, *, mips: str = "native", **kwargs):
        if mips not in MIPS:
            raise ValueError(f"Unknown mips {mips!r}. Valid: {', '.join(MIPS)}")
        super().__init__(num_classes, dim, index=None, **kwargs)
