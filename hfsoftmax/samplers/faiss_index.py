"""faiss indexes over the class rows: IVF-Flat by default, HNSW optional.

IVF-Flat (Jegou et al., TPAMI 2011): k-means into ``nlist ~ sqrt(N)`` cells, a query scans
the ``nprobe`` nearest cells exhaustively. faiss releases the GIL in train/add/search.
Both metrics use ``METRIC_INNER_PRODUCT`` (cosine: on unit vectors, see ``index.py``).
"""
from __future__ import annotations

import math

import numpy as np

from .index import Index

__all__ = ["FaissIndex"]

INDEX_TYPES = ("ivf", "hnsw")


class FaissIndex(Index):
    """Options: ``index_type`` ("ivf" or "hnsw"); IVF: ``nlist`` (default round(sqrt(N))),
    ``nprobe`` (8); HNSW: ``M`` (16), ``ef_construction`` (100), ``ef`` (64);
    ``num_threads`` (None: faiss' default; note faiss' OpenMP setting is process-wide)."""

    name = "faiss"

    def __init__(self, num_classes, dim, *, index_type: str = "ivf", nlist: int | None = None,
                 nprobe: int = 8, M: int = 16, ef_construction: int = 100, ef: int = 64,
                 num_threads: int | None = None, **kwargs):
        super().__init__(num_classes, dim, **kwargs)
        import faiss
        if index_type not in INDEX_TYPES:
            raise ValueError(f"Unknown faiss index_type {index_type!r}. Valid: "
                             f"{', '.join(INDEX_TYPES)}")
        self.index_type = index_type
        if nlist is None:
            nlist = max(1, int(round(math.sqrt(self.num_classes))))
        if not 1 <= nlist <= self.num_classes:
            raise ValueError(f"nlist must be in [1, num_classes={self.num_classes}], got {nlist}")
        self.nlist = int(nlist)
        self.nprobe = int(min(max(1, nprobe), self.nlist))
        self.M, self.ef_construction, self.ef = int(M), int(ef_construction), int(ef)
        if num_threads is not None:
            faiss.omp_set_num_threads(int(num_threads))

    def build(self, rows: np.ndarray):
        import faiss
        d = rows.shape[1]
        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef
            index.add(rows)
            return index, None
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.train(rows)
        index.add(rows)
        index.nprobe = self.nprobe
        return index, quantizer  # keep the quantizer alive as long as the index

    def search_scored(self, index, queries: np.ndarray, k: int):
        index = index[0]
        if self.index_type == "hnsw" and index.hnsw.efSearch < k:
            index.hnsw.efSearch = k
        scores, ids = index.search(queries, k)  # inner products; -1 ids pad
        ids = ids.astype(np.int64, copy=False)
        scores = scores.astype(np.float32, copy=True)
        scores[ids < 0] = -np.inf
        return ids, scores
