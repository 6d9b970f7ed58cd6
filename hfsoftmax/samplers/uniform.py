"""Uniform random negatives: InsightFace Partial FC's rule (the baseline).

Every batch label plus ``sample_num - n_labels`` classes drawn uniformly without replacement
(An et al., "Partial FC", ICCVW 2021). No index, so ``maybe_rebuild`` does nothing.
"""
from __future__ import annotations

from .base import ClassSampler

__all__ = ["RandomSampler"]


class RandomSampler(ClassSampler):
    """Labels + uniform random classes; never builds an index."""

    name = "random"
    needs_index = False

    def _build_index(self, rows):
        return None

    def _search(self, index, queries, k):
        raise RuntimeError("the random sampler has no index to query")

    def query(self, features, k):
        """Not available: the random sampler keeps no index (use ``select``)."""
        raise RuntimeError("the random sampler has no nearest-class index; use select()")
