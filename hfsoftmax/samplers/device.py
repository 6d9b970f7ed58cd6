"""The ``device`` sampler: HF-Softmax's selection, exact, where the features are.

Zhang et al. (AAAI 2018) select each batch's classes as its labels, the classes nearest to
its features and a random top-up (``selection.py``, the one rule). The other samplers find
the nearest classes in an index on the host, built from a snapshot of the rows every
``interval`` steps; on a GPU that costs a copy of the features to the host, the sync it
forces and a host search that takes longer than the GPU's whole step (see
``benchmarks/step_breakdown.py``). This sampler instead keeps a copy of all rows on the
features' device (:class:`~hfsoftmax.samplers.device_rows.DeviceRows`: normalised, float16
or bfloat16 on CUDA), refreshed from the row store every ``interval`` steps in the
background and updated in place with every row the sampled head changes
(:meth:`DeviceSampler.note_rows`, called from the head's push), and searches it exactly:

* a chunked matmul + top-k on the device, for the most neighbours the rule can ask of this
  batch (its unique labels are not known on the device without a sync);
* one device-to-host copy of the batch's labels and those neighbour ids (the only sync);
* the rule itself on the host, on ids only (``select_classes``, with this sampler's seeded
  RNG), and the selection back to the device through pinned memory.

So it selects exactly what the ``exact`` sampler selects over the same rows, with the same
seed (ids, remapped labels, random top-up, log-Q offsets), up to the copy's precision; with
float32 (the CPU's default) bit for bit. It is never stale, so ``fresh_rows`` has no use
here (ignored, logged). It runs in the trainer (``process=True`` is ignored: the copy lives
on the accelerator).

>>> sampler = build_sampler("device", num_classes, dim, metric="cosine", interval=100)
>>> sampler.maybe_rebuild(step, rowstore.reader())     # the first copy, then refreshes
>>> class_ids, target = sampler.select(features, labels, sample_num=8000)
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .device_rows import DeviceRows, to_device
from .selection import check_labels, neighbour_slots, neighbours_per_sample
from .selector import ClassSampler, check_policy

__all__ = ["DeviceSampler"]

logger = logging.getLogger(__name__)


class DeviceSampler(ClassSampler):
    """Exact nearest-class selection over a device copy of the rows; see the module
    docstring. Options besides the sampler's own (``interval``, ``background``,
    ``random_share``, ``neighbour_oversample``, ``seed``): ``device`` (None: the current
    CUDA device, else the CPU), ``dtype`` (None: float16 for cosine, bfloat16 for ``ip`` on
    CUDA; float32 elsewhere), ``chunk_rows`` (rows per matmul, default 65536), ``load_rows``
    (rows per transfer of a refresh). ``fresh_rows`` and ``mips`` are accepted and have no
    use (the copy is always current; scores are exact inner products).

    The sampled head calls :meth:`note_rows` only for a sampler whose ``fresh`` is set, so
    ``fresh`` is the copy itself: every row of it is fresh.
    """

    #: the sampled head hands it the features where they are (no host copy for selection)
    selects_on_device = True

    def __init__(self, num_classes: int, dim: int, *, metric: str = "ip", seed: int = 0,
                 interval: int = 100, background: bool = True,
                 neighbour_oversample: float = 1.25, random_share: float = 0.0,
                 fresh_rows: int = 0, mips: str = "native", device=None, dtype=None,
                 chunk_rows: int = 65536, load_rows: int = 32768):
        check_policy(interval=interval, neighbour_oversample=neighbour_oversample,
                     random_share=random_share, fresh_rows=fresh_rows)
        from .index import MIPS
        if mips not in MIPS:
            raise ValueError(f"Unknown mips {mips!r}. Valid: {', '.join(MIPS)}")
        rows = DeviceRows(num_classes, dim, metric=metric, device=device, dtype=dtype,
                          chunk_rows=chunk_rows, load_rows=load_rows)
        super().__init__(num_classes, dim, metric=metric, seed=seed, interval=interval,
                         background=background, neighbour_oversample=neighbour_oversample,
                         random_share=random_share, fresh_rows=0, index=rows)
        if fresh_rows:
            logger.info("device sampler: fresh_rows=%d ignored: every changed row is written "
                        "into the device copy (note_rows), so it is never stale", fresh_rows)
        #: the copy; also what the head's push hook checks before calling note_rows
        self.fresh = rows
        self._warned_device = False

    @property
    def rows(self) -> DeviceRows:
        """The device copy of the rows."""
        return self.index

    # ------------------------------------------------------------------ refreshes, notes
    def maybe_rebuild(self, step: int, read_rows) -> bool:
        """The interval policy (``ClassSampler.maybe_rebuild``), after swapping in a
        finished background refresh."""
        self.index.swap_ready()
        return super().maybe_rebuild(step, read_rows)

    def note_rows(self, class_ids, rows, step: int | None = None) -> None:
        """Write rows training just changed (their new values; numpy or tensors) into the
        copy in place. The head passes ``W_S - lr * grad``: exact with row momentum 0 and no
        weight decay, otherwise an estimate the next refresh replaces by the store's
        values."""
        self.index.note(class_ids, rows, self.current_step if step is None else int(step))

    # ------------------------------------------------------------------ queries
    def _features(self, features) -> torch.Tensor:
        """Features as a (B, dim) tensor where they are (no host copy); ValueError naming the
        shape otherwise."""
        x = features if isinstance(features, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (batch_size, dim={self.dim}), got "
                             f"{tuple(x.shape)}; the sampler was built for dim={self.dim}")
        dev = self.index.device
        if x.device != dev and x.device.type != "cpu" and not self._warned_device:
            logger.warning("device sampler: features on %s, the copy on %s: every query is "
                           "copied across (build it with device=%r)", x.device, dev,
                           str(x.device))
            self._warned_device = True
        return x

    def _query(self, features, k: int, scored: bool):
        x = self._features(features)
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.index.swap_ready()
        k = min(int(k), self.num_classes)
        if x.shape[0] == 0 and self.index.has_index:
            ids = np.empty((0, k), dtype=np.int64)
            return (ids, np.empty((0, k), dtype=np.float32)) if scored else ids
        return self.index.search(x, k, scored)

    def neighbours(self, features, k: int) -> np.ndarray:
        """(B, k) nearest classes over the current rows (the same as :meth:`query`)."""
        return self._query(features, k, scored=False)

    def _labels_host(self, labels, nb: torch.Tensor | None):
        """Labels and neighbour ids on the host, in one device-to-host copy when both are
        tensors on one device (the step's only sync)."""
        lab_t = labels if isinstance(labels, torch.Tensor) else None
        ok = (lab_t is not None and lab_t.ndim == 1 and not lab_t.dtype.is_floating_point
              and lab_t.dtype != torch.bool)
        if nb is not None and ok and lab_t.device == nb.device \
                and lab_t.shape[0] == nb.shape[0]:
            packed = torch.cat([lab_t.long()[:, None], nb], dim=1).cpu().numpy()
            return packed[:, 0], packed[:, 1:]
        lab = labels.detach().cpu().numpy() if lab_t is not None else np.asarray(labels)
        return lab, (None if nb is None else nb.cpu().numpy())

    def select(self, features, labels, sample_num: int, log_weights: bool | str = False):
        """The selection of :meth:`ClassSampler.select` (same rule, RNG and outputs), with
        the nearest classes found on the copy's device; see the module docstring."""
        self._check_log_weights(log_weights)
        out_device = _device_of(features) or _device_of(labels)
        x = self._features(features)
        b = x.shape[0]
        self.index.swap_ready()
        searching = (isinstance(sample_num, (int, np.integer)) and not isinstance(sample_num, bool)
                     and 0 < sample_num < self.num_classes and b > 0)
        nb = None
        if searching and self.index.has_index:
            # the most neighbours this batch can need (one distinct label); the rule trims
            # them on the host once the labels are known there
            need_max = neighbour_slots(sample_num, 1, self.random_share)
            if need_max > 0:
                k_max = neighbours_per_sample(need_max, b, self.neighbour_oversample)
                nb = self.index.topk(x, min(k_max, self.num_classes))[1]
        lab, nb = self._labels_host(labels, nb)
        lab = check_labels(lab, self.num_classes)
        if lab.shape[0] != b:
            raise ValueError(f"labels must have shape (batch_size,) = ({b},), got "
                             f"({lab.shape[0]},)")
        neighbours = None
        if searching:
            need = neighbour_slots(sample_num, np.unique(lab).size, self.random_share)
            if not self.index.has_index:
                if not self._warned_no_index:
                    logger.info("device sampler: no copy of the rows yet, selecting labels + "
                                "random classes until the first refresh is ready")
                    self._warned_no_index = True
            elif need > 0:
                k = neighbours_per_sample(need, b, self.neighbour_oversample)
                neighbours = nb[:, :min(k, self.num_classes)]
        out = self._apply_rule(lab, neighbours, sample_num, log_weights)
        if out_device is not None:
            return tuple(to_device(torch.from_numpy(np.ascontiguousarray(a)), out_device)
                         for a in out)
        return out

    def stats(self) -> dict:
        out = super().stats()
        out["fresh_rows"] = None  # the copy is not a fresh-rows store
        return out


def _device_of(x):
    return x.device if isinstance(x, torch.Tensor) else None
