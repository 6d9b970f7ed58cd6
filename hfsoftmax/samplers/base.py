"""The class-sampler interface: an index over the classifier rows, rebuilt in the background,
queried per batch for the nearest classes of the features (HF-Softmax, AAAI 2018).

A backend implements two methods over prepared float32 arrays:
``_build_index(rows) -> index`` and ``_search(index, queries, k) -> (B, k) int64``
(``-1`` pads missing results). Everything else lives here: metric handling, the selection
rule, the rebuild policy and the atomic swap.

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

Rebuilds. ``maybe_rebuild(step, read_rows)`` starts a rebuild every ``interval`` steps on a
daemon thread: it reads the rows (``read_rows`` may be an array or a callable that reads the
row store in chunks; the callable runs on the rebuild thread, so it must not share a
non-thread-safe socket with the training thread), builds a new index (annoy, hnswlib and
faiss release the GIL while building) and swaps it in with a single reference assignment
under a lock. ``select`` only takes that lock to read the reference, so a training step
never waits for a rebuild; until the first index exists it selects labels + random classes.

>>> sampler = build_sampler("hnsw", num_classes, dim, metric="cosine", interval=100)
>>> sampler.maybe_rebuild(step, rowstore.read_all)
>>> class_ids, target = sampler.select(features, labels, sample_num=1000)
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Any, Callable, Union

import numpy as np

from .fresh import FreshRows, merge_topk
from .selection import (check_labels, check_random_share, neighbour_slots, own_slots,
                        select_classes, topup_log_weights)

logger = logging.getLogger(__name__)

RowsSource = Union[np.ndarray, Callable[[], np.ndarray]]
METRICS = ("ip", "cosine")

__all__ = ["ClassSampler", "METRICS", "RowsSource", "to_numpy_features"]


def to_numpy_features(features) -> np.ndarray:
    """Features (torch tensor on any device, or array) as a C-contiguous float32 numpy array."""
    torch = sys.modules.get("torch")  # not imported: cannot be a tensor (keeps an index
    if torch is not None and isinstance(features, torch.Tensor):  # process torch-free)
        # note: a CPU-GPU sync point when the features live on a GPU
        features = features.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(features, dtype=np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class ClassSampler:
    """Base of all class samplers; see the module docstring for the contract.

    ``fresh_rows`` (default 0: off) keeps the values of up to that many rows that training
    changed since the index was built (:meth:`note_rows`, called by the sampled head with the
    rows it pulled) and searches them exactly beside the index
    (:mod:`~hfsoftmax.samplers.fresh`), so the selection no longer goes stale between
    rebuilds; when that many rows are kept, the index is rebuilt early.

    ``random_share`` (0 to 1, default 0: the paper's rule) keeps that share of the slots left
    after a batch's labels for uniformly random classes; the nearest classes fill the rest
    (:func:`~hfsoftmax.samplers.selection.select_classes`).
    """

    name = "base"
    #: False for samplers that never build an index (uniform random negatives).
    needs_index = True
    #: False for the exact backend (raw matmul); ANN backends honour ``mips``.
    angular_index = True

    def __init__(self, num_classes: int, dim: int, *, metric: str = "ip", seed: int = 0,
                 interval: int = 100, background: bool = True,
                 neighbour_oversample: float = 1.25, mips: str = "native",
                 random_share: float = 0.0, fresh_rows: int = 0):
        if not isinstance(num_classes, (int, np.integer)) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}. Valid metrics: {', '.join(METRICS)} "
                             "('ip' for the linear head, 'cosine' for margin heads)")
        if not isinstance(interval, (int, np.integer)) or interval <= 0:
            raise ValueError(f"interval must be a positive number of steps, got {interval!r}")
        if neighbour_oversample < 1.0:
            raise ValueError(f"neighbour_oversample must be >= 1.0, got {neighbour_oversample}")
        if mips not in ("native", "augment"):
            raise ValueError(f"Unknown mips {mips!r}. Valid: native, augment")
        self.mips = mips if (self.angular_index and metric == "ip") else "native"
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.metric = metric
        self.seed = int(seed)
        self.interval = int(interval)
        self.background = bool(background)
        self.neighbour_oversample = float(neighbour_oversample)
        self.random_share = check_random_share(random_share)
        if isinstance(fresh_rows, bool) or not isinstance(fresh_rows, (int, np.integer)) \
                or fresh_rows < 0:
            raise ValueError(f"fresh_rows must be a non-negative integer (0: off), got "
                             f"{fresh_rows!r}")
        if fresh_rows and self.mips == "augment":
            raise ValueError("fresh_rows needs comparable scores, which mips='augment' does not "
                             "give; use mips='native' (the default)")
        #: rows changed since the index's snapshot, searched exactly beside it (None: off)
        self.fresh = (FreshRows(self.num_classes, self.dim, int(fresh_rows),
                                normalize=metric == "cosine")
                      if fresh_rows and self.needs_index else None)
        self.rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._index: Any = None          # swapped atomically under _lock
        self._index_step: int | None = None
        self._thread: threading.Thread | None = None
        self._rebuild_error: BaseException | None = None
        self._last_start_step: int | None = None
        self._warned_no_index = False
        self.current_step = 0
        #: seconds the last finished rebuild took (read + build), None before the first
        self.last_rebuild_s: float | None = None
        #: seconds the last rebuild spent reading rows
        self.last_read_s: float | None = None
        self.rebuilds = 0
        #: neighbours (not random classes) in the last selection, for telemetry
        self.last_num_neighbours = 0

    # ------------------------------------------------------------------ backend hooks
    def _build_index(self, rows: np.ndarray) -> Any:
        """Build an index over prepared rows (N, index_dim) float32; returns the index."""
        raise NotImplementedError

    def _search(self, index: Any, queries: np.ndarray, k: int) -> np.ndarray:
        """(B, k) int64 ids of the nearest prepared rows; -1 where fewer than k were found."""
        raise NotImplementedError

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
            return _normalize(rows)
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
        q = _normalize(features)
        if self.mips == "augment":
            q = np.concatenate([q, np.zeros((q.shape[0], 1), dtype=np.float32)], axis=1)
        return np.ascontiguousarray(q, dtype=np.float32)

    def _check_features(self, features) -> np.ndarray:
        x = to_numpy_features(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (batch_size, dim={self.dim}), got "
                             f"{tuple(x.shape)}; the sampler was built for dim={self.dim}")
        return x

    # ------------------------------------------------------------------ index lifecycle
    @property
    def has_index(self) -> bool:
        """Whether an index is ready to query."""
        return self._index is not None

    @property
    def rebuilding(self) -> bool:
        """Whether a background rebuild is running."""
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def index_age(self) -> int | None:
        """Steps since the rows of the current index were read; None without an index."""
        step = self._index_step
        return None if step is None else self.current_step - step

    def rebuild(self, rows: RowsSource, step: int | None = None) -> float:
        """Synchronously (re)build the index from ``rows`` and swap it in; returns seconds."""
        if not self.needs_index:
            return 0.0
        step = self.current_step if step is None else int(step)
        t0 = time.perf_counter()
        raw = rows() if callable(rows) else rows
        t_read = time.perf_counter() - t0
        index = self._build_index(self.prepare_rows(raw))
        del raw
        elapsed = time.perf_counter() - t0
        with self._lock:  # the swap: one reference assignment
            self._index = index
            self._index_step = step
            self.last_rebuild_s = elapsed
            self.last_read_s = t_read
            self.rebuilds += 1
        logger.info("%s sampler: index over %d classes rebuilt from the rows of step %d in "
                    "%.2f s (read %.2f s)", self.name, self.num_classes, step, elapsed, t_read)
        return elapsed

    def start_rebuild(self, rows: RowsSource, step: int | None = None) -> bool:
        """Start a rebuild on a background thread; False if one is already running.

        Training keeps querying the old index until the new one is swapped in.
        """
        if not self.needs_index:
            return False
        self._raise_rebuild_error()
        if self.rebuilding:
            logger.debug("%s sampler: rebuild still running, not starting another", self.name)
            return False
        step = self.current_step if step is None else int(step)
        self._last_start_step = step

        def run():
            try:
                self.rebuild(rows, step)
            except BaseException as exc:  # surfaced on the training thread
                logger.exception("%s sampler: background rebuild failed", self.name)
                self._rebuild_error = exc

        self._thread = threading.Thread(target=run, name=f"{self.name}-index-rebuild",
                                        daemon=True)
        self._thread.start()
        return True

    def wait_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a running background rebuild; True if none is running any more."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        self._raise_rebuild_error()
        return not self.rebuilding

    def maybe_rebuild(self, step: int, read_rows: RowsSource) -> bool:
        """The interval policy, called once per training step; True if a rebuild started.

        The first call starts the first build; later ones every ``interval`` steps after the
        previous start (a rebuild still running when the next is due is not doubled). With
        ``background=False`` the rebuild runs synchronously.
        """
        self.current_step = int(step)
        if not self.needs_index:
            return False
        self._raise_rebuild_error()
        fresh_full = False
        if self.fresh is not None:
            self.fresh.drop_before(self._index_step)  # the current index holds those rows
            fresh_full = self.fresh.full and not self.rebuilding
        due = (self._last_start_step is None
               or self.current_step - self._last_start_step >= self.interval or fresh_full)
        if not due:
            return False
        if not self.background:
            self._last_start_step = self.current_step
            self.rebuild(read_rows, self.current_step)
            return True
        return self.start_rebuild(read_rows, self.current_step)

    def _raise_rebuild_error(self):
        err, self._rebuild_error = self._rebuild_error, None
        if err is not None:
            raise RuntimeError(f"{self.name} sampler: the background index rebuild failed: "
                               f"{err!r}") from err

    def close(self, timeout: float | None = None):
        """Wait for a running rebuild (daemon thread) and drop the index."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        with self._lock:
            self._index = None
            self._index_step = None
        if self.fresh is not None:
            self.fresh.clear()

    # ------------------------------------------------------------------ queries
    def query(self, features, k: int) -> np.ndarray:
        """(B, k) int64 ids of the nearest classes by the head's logit, best first.

        ``-1`` pads rows where the index found fewer than k classes. Raises RuntimeError when
        no index has been built yet.
        """
        return self._query(features, k, scored=False)

    def query_scored(self, features, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`query`, with each neighbour's score (the logit the index ranks by:
        cosine or inner product; -inf where the id is -1 padding)."""
        return self._query(features, k, scored=True)

    def _query(self, features, k: int, scored: bool):
        x = self._check_features(features)
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        with self._lock:
            index = self._index
        if index is None:
            raise RuntimeError(f"{self.name} sampler has no index yet: call rebuild(rows) or "
                               "maybe_rebuild(step, read_rows) first")
        k = min(int(k), self.num_classes)
        if x.shape[0] == 0:
            ids = np.empty((0, k), dtype=np.int64)
            return (ids, np.empty((0, k), dtype=np.float32)) if scored else ids
        search = self._search_scored if scored else self._search
        return search(index, self.prepare_queries(x), k)

    def _search_scored(self, index, queries: np.ndarray, k: int):
        raise NotImplementedError(f"the {self.name} sampler cannot score its neighbours, which "
                                  "fresh_rows needs; use fresh_rows=0")

    def note_rows(self, class_ids, rows, step: int | None = None) -> None:
        """Tell the sampler the current values of rows that training is about to change
        (the sampled head calls it with the rows it pulled); a no-op without fresh_rows."""
        if self.fresh is None:
            return
        self.fresh.note(np.asarray(class_ids), np.asarray(rows),
                        self.current_step if step is None else int(step))

    def _neighbours(self, index, x: np.ndarray, k: int) -> np.ndarray:
        """(B, k) nearest classes: the index's, merged with the fresh rows' when kept."""
        fresh = self.fresh
        if fresh is None or fresh.size == 0:
            return self._search(index, self.prepare_queries(x), k)
        # room for index hits whose indexed values are stale (their fresh values compete)
        k_index = min(2 * k, self.num_classes)
        ids_i, sc_i = self._search_scored(index, self.prepare_queries(x), k_index)
        fresh.drop_before(self._index_step)  # after the search: a process index reports it
        sc_i = np.array(sc_i, dtype=np.float32, copy=True)
        sc_i[fresh.contains(ids_i)] = -np.inf
        q = _normalize(x) if self.metric == "cosine" else x
        ids_f, sc_f = fresh.topk(q, k)
        return merge_topk(ids_i, sc_i, ids_f, sc_f, k)

    def select(self, features, labels, sample_num: int, log_weights: bool | str = False):
        """The HF-Softmax selection for one batch: ``(class_ids (S,), remapped_labels (B,))``.

        ``class_ids`` holds the batch's unique labels first, then the nearest classes of the
        features (rank-interleaved, de-duplicated), then uniformly random classes, exactly
        ``sample_num`` distinct ids in [0, num_classes); ``class_ids[remapped] == labels``.
        With ``sample_num >= num_classes`` it is ``arange(num_classes)`` and the labels are
        unchanged. Both are LongTensors on the features' device (numpy in, numpy out).
        ``log_weights=True`` adds a third value, the (S,) float32 logit offsets of the log-Q
        correction (:func:`~hfsoftmax.samplers.selection.topup_log_weights`: 0 for labels
        and neighbours, ``log(#other classes / #random)`` for the random top-up);
        ``log_weights="sample"`` adds instead each sample's own slots, (B, 1 + k) int64 (its
        label's, then its own neighbours'; :func:`~hfsoftmax.samplers.selection.own_slots`),
        from which :func:`~hfsoftmax.samplers.selection.sample_log_weights` makes the
        per-sample correction's (B, S) offsets.
        """
        if not (log_weights is False or log_weights is True or log_weights == "sample"):
            raise ValueError(f"log_weights must be False, True or 'sample', got {log_weights!r}")
        device = _torch_device(features) or _torch_device(labels)
        x = self._check_features(features)
        lab = _labels_to_numpy(labels)
        lab = check_labels(lab, self.num_classes)
        if lab.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have shape (batch_size,) = ({x.shape[0]},), got "
                             f"({lab.shape[0]},)")
        neighbours = None
        if self.needs_index and 0 < sample_num < self.num_classes and x.shape[0]:
            need = neighbour_slots(sample_num, np.unique(lab).size, self.random_share)
            with self._lock:
                index = self._index
            if index is None:
                if not self._warned_no_index:
                    logger.info("%s sampler: no index yet, selecting labels + random classes "
                                "until the first build is ready", self.name)
                    self._warned_no_index = True
            elif need > 0:
                if self.fresh is not None:  # the fresh rows' search runs where the features are
                    self.fresh.to(device)
                k = math.ceil(need / x.shape[0] * self.neighbour_oversample) + 1
                k = min(k, self.num_classes)
                neighbours = self._neighbours(index, x, k)
        ids, remapped, n_near = select_classes(lab, neighbours, sample_num, self.num_classes,
                                               self.rng, self.random_share)
        self.last_num_neighbours = n_near
        out = (ids, remapped)
        if log_weights == "sample":
            out += (own_slots(ids, remapped, neighbours),)
        elif log_weights:  # labels and neighbours 0, the random top-up log(#others / #random);
            # all zeros when every class is selected (no class left for a random one to stand for)
            out += (topup_log_weights(ids.size, self.num_classes,
                                      np.unique(lab).size + n_near),)
        if device is not None:
            import torch
            return tuple(torch.from_numpy(a).to(device) for a in out)
        return out

    # ------------------------------------------------------------------ telemetry
    def stats(self) -> dict:
        """Scalars for logs/TensorBoard: rebuild time, index age, rebuild count."""
        return {"rebuild_s": self.last_rebuild_s, "index_age": self.index_age,
                "rebuilds": self.rebuilds, "rebuilding": self.rebuilding,
                "neighbours_selected": self.last_num_neighbours,
                "fresh_rows": None if self.fresh is None else self.fresh.size}

    def recall_of_true_topk(self, features, rows: np.ndarray, selected_ids, k: int = 10,
                            labels=None) -> float:
        """Fraction of the true top-k classes (exact logits, this sampler's metric) that
        ``selected_ids`` contains; see :func:`hfsoftmax.samplers.recall_of_true_topk`."""
        from .telemetry import recall_of_true_topk
        return recall_of_true_topk(features, rows, selected_ids, k, metric=self.metric,
                                   labels=labels)

    def __repr__(self):
        return (f"{type(self).__name__}(num_classes={self.num_classes}, dim={self.dim}, "
                f"metric={self.metric!r}, interval={self.interval})")


def _torch_device(x):
    """The device of a torch tensor, None for anything else."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return x.device if isinstance(x, torch.Tensor) else None


def _labels_to_numpy(labels) -> np.ndarray:
    if _torch_device(labels) is not None:
        return labels.detach().cpu().numpy()
    return np.asarray(labels)
