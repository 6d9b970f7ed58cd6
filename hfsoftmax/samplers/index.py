"""The nearest-class index a backend implements: metric preparation, build, search.

An :class:`Index` is a backend's recipe, not the built structure: ``build(rows)`` returns a
new built index (an Annoy forest, an hnswlib graph, a faiss index, a torch matrix) and
``search(built, queries, k)`` asks one. Keeping the built structure out of the object lets
the handle (:mod:`~hfsoftmax.samplers.handle`) build the next index on a thread while the
current one keeps answering, then swap them with one reference assignment.

Metrics. The index ranks classes by the head's logit:

* ``"cosine"`` (margin heads): rows and queries are L2-normalised, so the nearest classes by
  angle are the largest cosine logits.
* ``"ip"`` (linear head): maximum inner product search, by default with each backend's
  native inner-product metric (hnswlib ``ip`` space, faiss ``METRIC_INNER_PRODUCT``, Annoy
  ``dot``); queries keep their raw values (a query's norm does not change its ranking).
  ``mips="augment"`` instead applies the textbook reduction to angular search (Bachrach et
  al. 2014): with ``M = max_i |w_i|``, row ``w -> [w, sqrt(M^2 - |w|^2)] / M`` and query
  ``q -> [q / |q|, 0]``, so ``cos(q', w') = q.w / (|q| M)``. It is exact but measured much
  worse: on 20K x 128 clustered rows with norms in [0.5, 1.5], recall@10 annoy 0.40, hnswlib
  0.65, faiss IVF 0.81 against 0.99, 1.00, 1.00 natively (the augmented rows crowd towards
  the extra axis, which the trees and graphs split poorly), hence the native default. With
  unit-length rows both are the same as cosine. The exact backend uses the raw matmul.

This module never imports torch (an index process for annoy, hnswlib or faiss stays
torch-free); the exact backend imports it where it searches.

>>> index = build_index("hnsw", num_classes, dim, metric="cosine")
>>> built = index.build(index.prepare_rows(rows))
>>> ids = index.search(built, index.prepare_queries(features), k=10)
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

__all__ = ["Index", "METRICS", "MIPS", "check_features", "check_table", "normalize",
           "to_numpy_features"]

METRICS = ("ip", "cosine")
MIPS = ("native", "augment")


def to_numpy_features(features) -> np.ndarray:
    """Features (torch tensor on any device, or array) as a C-contiguous float32 numpy array."""
    torch = sys.modules.get("torch")  # not imported: cannot be a tensor (keeps an index
    if torch is not None and isinstance(features, torch.Tensor):  # process torch-free)
        # note: a CPU-GPU sync point when the features live on a GPU
        features = features.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(features, dtype=np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def check_features(features, dim: int) -> np.ndarray:
    """``features`` as a (B, dim) float32 array, or ValueError naming the shape."""
    x = to_numpy_features(features)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"features must have shape (batch_size, dim={dim}), got "
                         f"{tuple(x.shape)}; the sampler was built for dim={dim}")
    return x


def check_table(num_classes, dim, metric) -> None:
    """ValueError naming the value unless ``num_classes`` and ``dim`` are positive integers
    and ``metric`` is one of :data:`METRICS`."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}. Valid metrics: {', '.join(METRICS)} "
                         "('ip' for the linear head, 'cosine' for margin heads)")


class Index:
    """Base of the index backends: the metric handling here, ``build`` and ``search`` (and
    ``search_scored``, which fresh rows need) in the backend.

    ``num_classes`` x ``dim`` rows; ``metric`` ``"ip"`` or ``"cosine"``; ``mips``
    ``"native"`` or ``"augment"`` (``ip`` only; see the module docstring); ``seed`` for
    backends that draw random numbers while building.
    """

    name = "base"
    #: False for backends that compare raw vectors (exact): ``mips`` does not apply.
    angular = True

    def __init__(self, num_classes: int, dim: int, *, metric: str = "ip",
                 mips: str = "native", seed: int = 0):
        check_table(num_classes, dim, metric)
        if mips not in MIPS:
            raise ValueError(f"Unknown mips {mips!r}. Valid: {', '.join(MIPS)}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.metric = metric
        self.seed = int(seed)
        self.mips = mips if (self.angular and metric == "ip") else "native"

    # ------------------------------------------------------------------ backend hooks
    def build(self, rows: np.ndarray) -> Any:
        """A new built index over prepared rows, (num_classes, index_dim) float32."""
        raise NotImplementedError(f"the {self.name} index does not implement build()")

    def search(self, built: Any, queries: np.ndarray, k: int) -> np.ndarray:
        """(B, k) int64 ids of the nearest prepared rows, best first; -1 where fewer than k
        were found. Default: the ids of :meth:`search_scored`."""
        return self.search_scored(built, queries, k)[0]

    def search_scored(self, built: Any, queries: np.ndarray, k: int):
        """``(ids, scores)``, (B, k) each: :meth:`search` with each neighbour's score, the
        logit the index ranks by (cosine or inner product; -inf where the id is -1)."""
        raise NotImplementedError(f"the {self.name} sampler cannot score its neighbours, "
                                  "which fresh_rows needs; use fresh_rows=0")

    def limit_threads(self, threads: int) -> None:
        """Hold the backend's compute to ``threads`` threads (the index process calls it; its
        ``OMP_NUM_THREADS`` is set already). Default: nothing more to do."""

    # ------------------------------------------------------------------ metric handling
    @property
    def index_dim(self) -> int:
        """Dimension of the vectors in the index (dim + 1 under the MIPS reduction)."""
        return self.dim + 1 if self.mips == "augment" else self.dim

    @property
    def index_metric(self) -> str:
        """What the index itself ranks by: ``"ip"`` on raw rows, or ``"cosine"`` on unit
        vectors (the cosine metric, or ``ip`` under ``mips="augment"``)."""
        return "ip" if (self.metric == "ip" and self.mips == "native") else "cosine"

    def prepare_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows as the index stores them (normalised, MIPS-augmented for ``ip``)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape != (self.num_classes, self.dim):
            raise ValueError(f"rows must have shape (num_classes, dim) = ({self.num_classes}, "
                             f"{self.dim}), got {tuple(rows.shape)}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if not np.isfinite(rows).all():
            raise FloatingPointError("the classifier rows contain NaN or Inf; the index "
                                     "cannot be built (did training diverge?)")
        if self.metric == "cosine":
            return normalize(rows)
        if self.mips == "native":
            return rows
        norms2 = np.einsum("ij,ij->i", rows, rows)
        m2 = float(norms2.max())
        scale = math.sqrt(m2) if m2 > 0 else 1.0
        out = np.empty((rows.shape[0], self.dim + 1), dtype=np.float32)
        out[:, :self.dim] = rows / scale
        out[:, self.dim] = np.sqrt(np.maximum(m2 - norms2, 0.0)) / scale
        return out

    def prepare_queries(self, features: np.ndarray) -> np.ndarray:
        """Queries as the index expects them (normalised; a zero column for ``ip``)."""
        if self.metric == "ip" and self.mips == "native":
            return features
        q = normalize(features)
        if self.mips == "augment":
            q = np.concatenate([q, np.zeros((q.shape[0], 1), dtype=np.float32)], axis=1)
        return np.ascontiguousarray(q, dtype=np.float32)

    def __repr__(self):
        return (f"{type(self).__name__}(num_classes={self.num_classes}, dim={self.dim}, "
                f"metric={self.metric!r}, mips={self.mips!r})")
