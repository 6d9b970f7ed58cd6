"""Clustered class rows and queries, for recall tests and the ANN benchmark.

Face-recognition classifiers have families of look-alike identities; the rows here are drawn
from a mixture of clusters (``family`` rows per cluster) so that the nearest classes are the
hard, close ones. Queries are features of random classes: their row plus noise.
"""
from __future__ import annotations

import numpy as np

__all__ = ["clustered_rows", "queries_near"]


def clustered_rows(num_rows: int, dim: int, *, family: int = 20, spread: float = 0.5,
                   unit: bool = True, seed: int = 0) -> np.ndarray:
    """(num_rows, dim) float32 rows in clusters of about ``family`` rows.

    ``spread`` is the norm of the within-cluster offset relative to the unit cluster centre.
    With ``unit=False`` the row norms vary in [0.5, 1.5] (a linear head's rows).
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(1, num_rows // family)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    assign = rng.integers(0, n_clusters, num_rows)
    noise = rng.standard_normal((num_rows, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    rows = centres[assign] + noise
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    if not unit:
        rows *= rng.uniform(0.5, 1.5, (num_rows, 1)).astype(np.float32)
    return rows.astype(np.float32)


def queries_near(rows: np.ndarray, num: int, *, noise: float = 0.3, seed: int = 1):
    """``(features, labels)``: ``num`` features near the rows of random classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, rows.shape[0], num)
    base = rows[labels] / np.linalg.norm(rows[labels], axis=1, keepdims=True)
    x = base + rng.standard_normal(base.shape).astype(np.float32) * (noise / np.sqrt(rows.shape[1]))
    return x.astype(np.float32), labels.astype(np.int64)
