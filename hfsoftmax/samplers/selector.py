"""The class sampler: HF-Softmax's per-batch class selection over an index handle.

Zhang et al., "Accelerated Training for Massive Classification via Dynamic Class Selection"
(AAAI 2018). A :class:`ClassSampler` owns what the training loop decides:

* the **index handle** it asks for the nearest classes: an
  :class:`~hfsoftmax.samplers.handle.IndexHandle` (the index in this process), a
  :class:`~hfsoftmax.samplers.process.ProcessIndexHandle` (in an index process), or none
  (``random``: labels + uniform negatives);
* the **rebuild policy**: :meth:`~ClassSampler.maybe_rebuild` starts a rebuild every
  ``interval`` steps (in the background unless ``background=False``), never doubles a running
  one, and starts one early when the fresh rows are full;
* the **fresh rows** (``fresh_rows``, :mod:`~hfsoftmax.samplers.fresh`): rows training
  changed since the index's snapshot, searched exactly beside it;
* the **selection rule** (:func:`~hfsoftmax.samplers.selection.select_classes`, the one
  implementation) with this sampler's seeded RNG, so the same seed and rows select the same
  classes whether the index lives here or in its own process;
* the **telemetry** (:meth:`~ClassSampler.stats`, ``index_age``, ``last_num_neighbours``).

>>> sampler = build_sampler("hnsw", num_classes, dim, metric="cosine", interval=100)
>>> sampler.maybe_rebuild(step, rowstore.read_all)
>>> class_ids, target = sampler.select(features, labels, sample_num=1000)
"""
from __future__ import annotations

import logging
import sys

import numpy as np

from .fresh import FreshRows, merge_topk
from .handle import IndexHandle, RowsSource
from .index import Index, check_features, check_table, normalize
from .selection import (check_labels, check_random_share, neighbour_slots,
                        neighbours_per_sample, select_with_correction)

__all__ = ["ClassSampler", "check_policy"]

logger = logging.getLogger(__name__)


def check_policy(*, interval: int = 100, background: bool = True,
                 neighbour_oversample: float = 1.25, random_share: float = 0.0,
                 fresh_rows: int = 0) -> None:
    """ValueError naming the value unless the sampler's own options are valid (checked
    before an index backend or process is made for them); TypeError for an unknown one."""
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) \
            or interval <= 0:
        raise ValueError(f"interval must be a positive number of steps, got {interval!r}")
    if neighbour_oversample < 1.0:
        raise ValueError(f"neighbour_oversample must be >= 1.0, got {neighbour_oversample}")
    check_random_share(random_share)
    if isinstance(fresh_rows, bool) or not isinstance(fresh_rows, (int, np.integer)) \
            or fresh_rows < 0:
        raise ValueError(f"fresh_rows must be a non-negative integer (0: off), got "
                         f"{fresh_rows!r}")


class ClassSampler:
    """Selects the classes of each batch's softmax; see the module docstring.

    ``index``: an :class:`~hfsoftmax.samplers.index.Index` backend (kept in this process by
    an :class:`~hfsoftmax.samplers.handle.IndexHandle`), an index handle, or None (no index:
    labels + random classes). It must be for the same ``num_classes``, ``dim`` and
    ``metric``. ``seed`` seeds the random top-up (``rng``); ``interval`` and ``background``
    set the rebuild policy; ``neighbour_oversample`` how many neighbours each feature asks
    for beyond its share.

    ``fresh_rows`` (default 0: off) keeps the values of up to that many rows that training
    changed since the index was built (:meth:`note_rows`, called by the sampled head with the
    rows it pulled) and searches them exactly beside the index, so the selection no longer
    goes stale between rebuilds; when that many rows are kept, the index is rebuilt early.

    ``random_share`` (0 to 1, default 0: the paper's rule) keeps that share of the slots left
    after a batch's labels for uniformly random classes; the nearest classes fill the rest.

    Backend options read through: ``sampler.nprobe`` is the in-process faiss index's.
    """

    def __init__(self, num_classes: int, dim: int, *, metric: str = "ip", seed: int = 0,
                 interval: int = 100, background: bool = True,
                 neighbour_oversample: float = 1.25, random_share: float = 0.0,
                 fresh_rows: int = 0, index=None):
        check_table(num_classes, dim, metric)
        check_policy(interval=interval, neighbour_oversample=neighbour_oversample,
                     random_share=random_share, fresh_rows=fresh_rows)
        self.num_classes, self.dim, self.metric = int(num_classes), int(dim), metric
        if isinstance(index, Index):
            index = IndexHandle(index)
        if index is not None and (index.num_classes, index.dim, index.metric) != \
                (self.num_classes, self.dim, metric):
            raise ValueError(f"the index is for {index.num_classes} x {index.dim} rows by "
                             f"{index.metric!r}, the sampler for {self.num_classes} x "
                             f"{self.dim} by {metric!r}")
        if fresh_rows and index is not None and index.mips == "augment":
            raise ValueError("fresh_rows needs comparable scores, which mips='augment' does not "
                             "give; use mips='native' (the default)")
        #: the index handle (None: no index, the selection is labels + random classes)
        self.index = index
        self.seed = int(seed)
        self.interval = int(interval)
        self.background = bool(background)
        self.neighbour_oversample = float(neighbour_oversample)
        self.random_share = check_random_share(random_share)
        #: rows changed since the index's snapshot, searched exactly beside it (None: off)
        self.fresh = (FreshRows(self.num_classes, self.dim, int(fresh_rows),
                                normalize=metric == "cosine")
                      if fresh_rows and index is not None else None)
        self.rng = np.random.default_rng(seed)
        self.current_step = 0
        self._last_start_step: int | None = None
        self._warned_no_index = False
        #: neighbours (not random classes) in the last selection, for telemetry
        self.last_num_neighbours = 0

    # ------------------------------------------------------------------ the index's state
    @property
    def name(self) -> str:
        """The backend's name (``exact``, ``hnsw-process``, ...; ``random`` without one)."""
        return "random" if self.index is None else self.index.name

    @property
    def needs_index(self) -> bool:
        """Whether this sampler selects by an index (False: labels + random classes)."""
        return self.index is not None

    @property
    def has_index(self) -> bool:
        """Whether an index is ready to query."""
        return self.index is not None and self.index.has_index

    @property
    def rebuilding(self) -> bool:
        """Whether a background rebuild is running."""
        return self.index is not None and self.index.rebuilding

    @property
    def index_age(self) -> int | None:
        """Steps since the rows of the current index were read; None without an index."""
        step = None if self.index is None else self.index.index_step
        return None if step is None else self.current_step - step

    @property
    def rebuilds(self) -> int:
        """Finished rebuilds."""
        return 0 if self.index is None else self.index.rebuilds

    @property
    def last_rebuild_s(self) -> float | None:
        """Seconds the last finished rebuild took (read + build), None before the first."""
        return None if self.index is None else self.index.last_rebuild_s

    @property
    def last_read_s(self) -> float | None:
        """Seconds the last rebuild spent reading rows."""
        return None if self.index is None else self.index.last_read_s

    @property
    def mips(self) -> str:
        """The index's MIPS mode (``"native"`` unless ``mips="augment"`` applies)."""
        return "native" if self.index is None else self.index.mips

    @property
    def index_dim(self) -> int:
        """Dimension of the vectors in the index (dim + 1 under the MIPS reduction)."""
        return self.dim + 1 if self.mips == "augment" else self.dim

    @property
    def index_metric(self) -> str:
        """What the index itself ranks by (see :attr:`~hfsoftmax.samplers.index.Index.
        index_metric`)."""
        return "ip" if (self.metric == "ip" and self.mips == "native") else "cosine"

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: backend options (sampler.nprobe) read
        # through to an in-process index's backend
        backend = getattr(self.__dict__.get("index"), "backend", None)
        if not name.startswith("_") and backend is not None and hasattr(backend, name):
            return getattr(backend, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ rebuild policy
    def rebuild(self, rows: RowsSource, step: int | None = None) -> float:
        """Synchronously (re)build the index from ``rows`` and swap it in; returns seconds."""
        if self.index is None:
            return 0.0
        return self.index.rebuild(rows, self.current_step if step is None else int(step))

    def start_rebuild(self, rows: RowsSource, step: int | None = None) -> bool:
        """Start a rebuild in the background now; False if one is already running.

        Queries keep using the old index until the new one is swapped in. The interval
        counts from here.
        """
        if self.index is None:
            return False
        step = self.current_step if step is None else int(step)
        started = self.index.start_rebuild(rows, step)
        if started:
            self._last_start_step = step
        return started

    def wait_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a running background rebuild; True if none is running any more. Raises
        the error of a failed one."""
        return True if self.index is None else self.index.wait(timeout)

    def maybe_rebuild(self, step: int, read_rows: RowsSource) -> bool:
        """The interval policy, called once per training step; True if a rebuild started.

        The first call starts the first build; later ones every ``interval`` steps after the
        previous start (a rebuild still running when the next is due is not doubled), or
        early when the fresh rows are full. With ``background=False`` the rebuild runs
        synchronously. A failed background rebuild is raised here.
        """
        self.current_step = int(step)
        if self.index is None:
            return False
        self.index.raise_error()
        fresh_full = False
        if self.fresh is not None:
            self.fresh.drop_before(self.index.index_step)  # the current index holds those
            fresh_full = self.fresh.full and not self.index.rebuilding
        due = (self._last_start_step is None
               or self.current_step - self._last_start_step >= self.interval or fresh_full)
        if not due:
            return False
        if not self.background:
            self._last_start_step = self.current_step
            self.index.rebuild(read_rows, self.current_step)
            return True
        return self.start_rebuild(read_rows, self.current_step)

    def close(self, timeout: float | None = None) -> None:
        """Close the index handle (a running in-process rebuild is waited for; an index
        process is stopped) and forget the fresh rows."""
        if self.index is not None:
            self.index.close(timeout)
        if self.fresh is not None:
            self.fresh.clear()

    # ------------------------------------------------------------------ queries
    def _check_features(self, features) -> np.ndarray:
        return check_features(features, self.dim)

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
        if self.index is None:
            raise RuntimeError(f"the {self.name} sampler has no nearest-class index; "
                               "use select()")
        x = self._check_features(features)
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(int(k), self.num_classes)
        if x.shape[0] == 0 and self.index.has_index:
            ids = np.empty((0, k), dtype=np.int64)
            return (ids, np.empty((0, k), dtype=np.float32)) if scored else ids
        return self.index.search(x, k, scored)

    def note_rows(self, class_ids, rows, step: int | None = None) -> None:
        """Tell the sampler the current values of rows that training is about to change
        (the sampled head calls it with the rows it pulled); a no-op without fresh_rows."""
        if self.fresh is None:
            return
        self.fresh.note(np.asarray(class_ids), np.asarray(rows),
                        self.current_step if step is None else int(step))

    def neighbours(self, features, k: int) -> np.ndarray:
        """(B, k) nearest classes as the selection sees them: the index's, merged with the
        fresh rows' when any are kept (:meth:`query` is the index's alone)."""
        return self._neighbours(self._check_features(features), k)

    def _neighbours(self, x: np.ndarray, k: int) -> np.ndarray:
        fresh = self.fresh
        if fresh is None or fresh.size == 0:
            return self.index.search(x, k)
        # room for index hits whose indexed values are stale (their fresh values compete)
        k_index = min(2 * k, self.num_classes)
        ids_i, sc_i = self.index.search(x, k_index, scored=True)
        fresh.drop_before(self.index.index_step)  # after the search: a process index reports it
        sc_i = np.array(sc_i, dtype=np.float32, copy=True)
        sc_i[fresh.contains(ids_i)] = -np.inf
        q = normalize(x) if self.metric == "cosine" else x
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
        self._check_log_weights(log_weights)
        device = _torch_device(features) or _torch_device(labels)
        x = self._check_features(features)
        lab = check_labels(_labels_to_numpy(labels), self.num_classes)
        if lab.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have shape (batch_size,) = ({x.shape[0]},), got "
                             f"({lab.shape[0]},)")
        neighbours = None
        if self.index is not None and 0 < sample_num < self.num_classes and x.shape[0]:
            need = neighbour_slots(sample_num, np.unique(lab).size, self.random_share)
            if not self.index.has_index:
                if not self._warned_no_index:
                    logger.info("%s sampler: no index yet, selecting labels + random classes "
                                "until the first build is ready", self.name)
                    self._warned_no_index = True
            elif need > 0:
                if self.fresh is not None:  # the fresh rows' search runs where the features are
                    self.fresh.to(device)
                k = neighbours_per_sample(need, x.shape[0], self.neighbour_oversample)
                neighbours = self._neighbours(x, min(k, self.num_classes))
        out = self._apply_rule(lab, neighbours, sample_num, log_weights)
        if device is not None:
            import torch
            return tuple(torch.from_numpy(a).to(device) for a in out)
        return out

    @staticmethod
    def _check_log_weights(log_weights) -> None:
        """ValueError unless ``log_weights`` is one of :meth:`select`'s values."""
        if not (log_weights is False or log_weights is True or log_weights == "sample"):
            raise ValueError(f"log_weights must be False, True or 'sample', got "
                             f"{log_weights!r}")

    def _apply_rule(self, lab: np.ndarray, neighbours: np.ndarray | None, sample_num: int,
                    log_weights: bool | str) -> tuple:
        """The end of :meth:`select` on the host: the rule and the log-Q output
        ``log_weights`` asks for (:func:`~.selection.select_with_correction`, with this
        sampler's RNG) over the checked labels and the neighbours found (or None), recording
        ``last_num_neighbours``; numpy arrays."""
        ids, remapped, n_near, extra = select_with_correction(
            lab, neighbours, sample_num, self.num_classes, self.rng, self.random_share,
            log_weights)
        self.last_num_neighbours = n_near
        return (ids, remapped, extra) if log_weights else (ids, remapped)

    # ------------------------------------------------------------------ telemetry
    def stats(self) -> dict:
        """Scalars for logs/TensorBoard: rebuild time, index age, rebuild count (and the
        index process's pid and memory, where there is one)."""
        out = {"rebuild_s": self.last_rebuild_s, "index_age": self.index_age,
               "rebuilds": self.rebuilds, "rebuilding": self.rebuilding,
               "neighbours_selected": self.last_num_neighbours,
               "fresh_rows": None if self.fresh is None else self.fresh.size}
        if self.index is not None:
            out.update(self.index.stats())
        return out

    def recall_of_true_topk(self, features, rows: np.ndarray, selected_ids, k: int = 10,
                            labels=None) -> float:
        """Fraction of the true top-k classes (exact logits, this sampler's metric) that
        ``selected_ids`` contains; see :func:`hfsoftmax.samplers.recall_of_true_topk`."""
        from .telemetry import recall_of_true_topk
        return recall_of_true_topk(features, rows, selected_ids, k, metric=self.metric,
                                   labels=labels)

    def __repr__(self):
        return (f"{type(self).__name__}(num_classes={self.num_classes}, dim={self.dim}, "
                f"metric={self.metric!r}, interval={self.interval}, index={self.index!r})")


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
