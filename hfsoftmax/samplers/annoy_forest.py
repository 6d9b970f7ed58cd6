"""The hashing forest of HF-Softmax: Annoy's random-projection trees (Spotify Annoy).

The paper (Zhang et al., AAAI 2018) indexes the classifier rows with a forest of 50 trees
rebuilt every 100 iterations. Annoy has no batch API: the build needs one ``add_item`` call
per row and a query one ``get_nns_by_vector`` call per feature, so both loops are kept as
tight as Python allows. ``cosine`` uses Annoy's ``angular`` metric (ANCHORS: on unit vectors
angular beat ``dot`` at equal trees); ``ip`` uses Annoy's ``dot`` (which reduces MIPS to
angular search internally), or ``angular`` on augmented rows with ``mips="augment"``.
"""
from __future__ import annotations

import numpy as np

from .base import ClassSampler

__all__ = ["AnnoySampler"]


class AnnoySampler(ClassSampler):
    """Options: ``ntrees`` (50, the paper's forest), ``search_k`` (nodes inspected per
    query; default chosen for recall@10 >= 0.9, see README), ``n_jobs`` (build threads)."""

    name = "annoy"

    def __init__(self, num_classes, dim, *, ntrees: int = 50, search_k: int = 3000,
                 n_jobs: int = -1, **kwargs):
        super().__init__(num_classes, dim, **kwargs)
        import annoy  # noqa: F401
        if ntrees <= 0:
            raise ValueError(f"ntrees must be positive, got {ntrees}")
        self.ntrees = int(ntrees)
        self.search_k = int(search_k)
        self.n_jobs = int(n_jobs)

    def _build_index(self, rows: np.ndarray):
        from annoy import AnnoyIndex
        index = AnnoyIndex(rows.shape[1], "dot" if self.index_metric == "ip" else "angular")
        index.set_seed(self.seed)
        add = index.add_item
        for i, row in enumerate(rows.tolist()):
            add(i, row)
        index.build(self.ntrees, n_jobs=self.n_jobs)
        return index

    def _search(self, index, queries: np.ndarray, k: int) -> np.ndarray:
        get = index.get_nns_by_vector
        sk = self.search_k
        res = [get(q, k, sk) for q in queries.tolist()]
        out = np.full((len(res), k), -1, dtype=np.int64)
        lens = np.fromiter(map(len, res), dtype=np.int64, count=len(res))
        if (lens == k).all():
            out[:] = res
        else:  # annoy may return fewer than k ids
            for row, r in zip(out, res):
                row[:len(r)] = r
        return out
