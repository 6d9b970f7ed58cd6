"""The hashing forest of HF-Softmax: Annoy's random-projection trees (Spotify Annoy).

The paper (Zhang et al., AAAI 2018) indexes the classifier rows with a forest of 50 trees
rebuilt every 100 iterations. Annoy has no batch API: the build needs one ``add_item`` call
per row and a query one ``get_nns_by_vector`` call per feature, so both loops are kept as
tight as Python allows. ``cosine`` uses Annoy's ``angular`` metric (ANCHORS: on unit vectors
angular beat ``dot`` at equal trees); ``ip`` uses Annoy's ``dot`` (which reduces MIPS to
angular search internally), or ``angular`` on augmented rows with ``mips="augment"``.

By default the forest is built in a child process (``_annoy_build.py``) from the rows saved
as .npy in a temporary folder, then memory-mapped with ``AnnoyIndex.load``: the ``add_item``
loop is Python and would otherwise hold the trainer's GIL for its whole duration (at 1M rows
tens of seconds), stalling every training step during a background rebuild. The trainer's
rebuild thread only waits on the child. ``subprocess_build=False`` builds in-process.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from .index import Index

__all__ = ["AnnoyForest"]


class AnnoyForest(Index):
    """Options: ``ntrees`` (50, the paper's forest), ``search_k`` (nodes inspected per
    query; 3000: recall@10 >= 0.9 on the clustered test set, see README), ``n_jobs``
    (build threads, -1: all cores), ``subprocess_build`` (True), ``tmp_dir`` (where the
    child's rows and index files go; default: the system temp folder)."""

    name = "annoy"

    def __init__(self, num_classes, dim, *, ntrees: int = 50, search_k: int = 3000,
                 n_jobs: int = -1, subprocess_build: bool = True, tmp_dir: str | None = None,
                 **kwargs):
        super().__init__(num_classes, dim, **kwargs)
        import annoy  # noqa: F401
        if ntrees <= 0:
            raise ValueError(f"ntrees must be positive, got {ntrees}")
        self.ntrees = int(ntrees)
        self.search_k = int(search_k)
        self.n_jobs = int(n_jobs)
        self.subprocess_build = bool(subprocess_build)
        self.tmp_dir = tmp_dir

    @property
    def annoy_metric(self) -> str:
        """Annoy's metric name for this sampler's index."""
        return "dot" if self.index_metric == "ip" else "angular"

    def build(self, rows: np.ndarray):
        from annoy import AnnoyIndex
        if self.subprocess_build:
            return self._build_in_child(rows)
        index = AnnoyIndex(rows.shape[1], self.annoy_metric)
        index.set_seed(self.seed)
        add = index.add_item
        for start in range(0, rows.shape[0], 4096):  # bounded tolist() memory
            for i, row in enumerate(rows[start:start + 4096].tolist(), start):
                add(i, row)
        index.build(self.ntrees, n_jobs=self.n_jobs)
        return index

    def _build_in_child(self, rows: np.ndarray):
        from annoy import AnnoyIndex
        work = tempfile.mkdtemp(prefix="hfsoftmax-annoy-", dir=self.tmp_dir)
        try:
            rows_path = os.path.join(work, "rows.npy")
            out_path = os.path.join(work, "forest.ann")
            np.save(rows_path, rows)
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_annoy_build.py")
            proc = subprocess.run(
                [sys.executable, "-I", script, rows_path, out_path, self.annoy_metric,
                 str(self.ntrees), str(self.seed), str(self.n_jobs)],
                capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"the Annoy build process failed (exit {proc.returncode}): "
                                   f"{proc.stderr.strip()[-2000:]}")
            index = AnnoyIndex(rows.shape[1], self.annoy_metric)
            index.load(out_path)  # memory-mapped; the mapping outlives the unlinked file
            return index
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def search(self, index, queries: np.ndarray, k: int) -> np.ndarray:
        get = index.get_nns_by_vector
        sk = self.search_k
        return _padded([get(q, k, sk) for q in queries.tolist()], k, -1, np.int64)

    def search_scored(self, index, queries: np.ndarray, k: int):
        get = index.get_nns_by_vector
        sk = self.search_k
        res = [get(q, k, sk, True) for q in queries.tolist()]
        ids = _padded([r[0] for r in res], k, -1, np.int64)
        dist = _padded([r[1] for r in res], k, np.nan, np.float32)
        # annoy's "dot" distance is the inner product; "angular" is sqrt(2 - 2 cos)
        scores = dist if self.annoy_metric == "dot" else 1.0 - 0.5 * dist * dist
        scores[ids < 0] = -np.inf
        return ids, scores


def _padded(lists: list, k: int, fill, dtype) -> np.ndarray:
    """(len(lists), k) array of the lists, ``fill`` where annoy returned fewer than k."""
    out = np.full((len(lists), k), fill, dtype=dtype)
    lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    if (lens == k).all():
        out[:] = lists
    else:
        for row, r in zip(out, lists):
            row[:len(r)] = r
    return out
