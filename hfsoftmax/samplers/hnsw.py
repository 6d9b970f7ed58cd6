"""hnswlib graph index (Malkov & Yashunin, HNSW, TPAMI 2018) over the class rows.

Batch queries in C++ with ``num_threads``; the build (``add_items``) releases the GIL, so a
background rebuild does not stall training. Rows are prepared in ``index.py``; the
graph uses hnswlib's ``ip`` space for both metrics (cosine: on unit vectors, avoiding
hnswlib's internal normalising copy).
"""
from __future__ import annotations

import numpy as np

from .index import Index

__all__ = ["HnswIndex"]


class HnswIndex(Index):
    """Options: ``M`` (16), ``ef_construction`` (100), ``ef`` (64, raised to k when needed),
    ``num_threads`` (-1: all cores, for build and queries)."""

    name = "hnsw"

    def __init__(self, num_classes, dim, *, M: int = 16, ef_construction: int = 100,
                 ef: int = 64, num_threads: int = -1, **kwargs):
        super().__init__(num_classes, dim, **kwargs)
        import hnswlib  # noqa: F401  (fail at construction, not at the first rebuild)
        for key, val in (("M", M), ("ef_construction", ef_construction), ("ef", ef)):
            if val <= 0:
                raise ValueError(f"{key} must be positive, got {val}")
        self.M, self.ef_construction, self.ef = int(M), int(ef_construction), int(ef)
        self.num_threads = int(num_threads)

    def build(self, rows: np.ndarray):
        import hnswlib
        index = hnswlib.Index(space="ip", dim=rows.shape[1])
        index.init_index(max_elements=rows.shape[0], ef_construction=self.ef_construction,
                         M=self.M, random_seed=self.seed)
        index.add_items(rows, np.arange(rows.shape[0]), num_threads=self.num_threads)
        index.set_ef(self.ef)
        return index

    def search_scored(self, index, queries: np.ndarray, k: int):
        # search() takes the ids from here: knn_query computes both anyway
        if index.ef < k:  # the graph search list must hold at least k results
            index.set_ef(k)
        ids, dist = index.knn_query(queries, k=k, num_threads=self.num_threads)
        return ids.astype(np.int64, copy=False), (1.0 - dist).astype(np.float32)  # ip space
