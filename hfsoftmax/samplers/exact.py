"""Exact nearest classes: torch matmul + top-k over the rows in chunks.

The reference the ANN backends are measured against, and the right choice for small class
counts. Memory stays bounded by ``chunk_rows`` (the (B, chunk) logits of one chunk at a
time; the per-chunk top-k are merged).
"""
from __future__ import annotations

import numpy as np

from .index import Index

__all__ = ["ExactIndex", "chunked_topk"]


def chunked_topk(queries, rows, k: int, chunk_rows: int = 65536, matmul=None):
    """Top-k row ids of ``queries @ rows.T`` (torch tensors, same device), best first.

    Returns ``(scores, ids)`` as (B, k) tensors; chunked so only (B, chunk_rows) logits exist
    at once. ``matmul(queries, block)`` replaces ``queries @ block.T`` (the device sampler
    scores half-precision rows into float32 this way).
    """
    import torch
    n = rows.shape[0]
    k = min(int(k), n)
    best_s = best_i = None
    for start in range(0, n, chunk_rows):
        block = rows[start:start + chunk_rows]
        scores = queries @ block.T if matmul is None else matmul(queries, block)
        s, i = torch.topk(scores, min(k, block.shape[0]), dim=1)
        i = i + start
        if best_s is None:
            best_s, best_i = s, i
        else:  # merge: top-k of (previous best, this chunk's best)
            cat_s = torch.cat([best_s, s], dim=1)
            cat_i = torch.cat([best_i, i], dim=1)
            best_s, pos = torch.topk(cat_s, k, dim=1)
            best_i = torch.gather(cat_i, 1, pos)
    return best_s, best_i


class ExactIndex(Index):
    """Exact search (torch, CPU); the built index is a copy of the prepared rows as a
    tensor. Options: ``chunk_rows`` (default 65536)."""

    name = "exact"
    angular = False  # raw inner products; cosine normalises rows and queries

    def __init__(self, num_classes, dim, *, chunk_rows: int = 65536, **kwargs):
        super().__init__(num_classes, dim, **kwargs)
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)

    def build(self, rows: np.ndarray):
        import torch
        return torch.from_numpy(np.array(rows, dtype=np.float32, copy=True))

    def search_scored(self, built, queries: np.ndarray, k: int):
        import torch
        with torch.no_grad():
            scores, ids = chunked_topk(torch.from_numpy(queries), built, k, self.chunk_rows)
        return ids.numpy().astype(np.int64, copy=False), scores.numpy().astype(np.float32)

    def limit_threads(self, threads: int) -> None:
        """torch keeps its own thread count (besides ``OMP_NUM_THREADS``)."""
        import torch
        torch.set_num_threads(int(threads))
