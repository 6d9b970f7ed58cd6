"""Rows changed since the index was built, searched exactly beside it ("fresh rows").

An ANN index is a snapshot: between rebuilds the rows it holds go stale. Only the rows that
training touched since the snapshot have moved, and the sampled head knows exactly which
those are and their values, because it pulled them for its step. :class:`FreshRows` keeps
them (up to ``capacity`` rows); a query then merges

* the index's neighbours that are *not* fresh (their indexed values are their current ones),
* with the exact top-k over the fresh rows (by the same score),

which is the exact top-k over the current rows up to the index's own approximation and the
one-step lag of the kept values (they are the values pulled for a step, before its update).
Rows kept before the current index's snapshot step are dropped (the index holds them).

Measured on the synthetic accuracy benchmark (``benchmarks/accuracy.py``): see
``benchmarks/ACCURACY.md``. The cost is one ``(B, D) x (D, n_fresh)`` product and its top-k
per step (on the features' device: :meth:`FreshRows.to`); when ``capacity`` rows are kept
the sampler rebuilds its index early (``ClassSampler.maybe_rebuild``, ``selector.py``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["FreshRows", "merge_topk"]


class FreshRows:
    """Last-known values of up to ``capacity`` class rows, keyed by class id.

    ``rows`` are stored as the index compares them (L2-normalised for the cosine metric).
    Not thread-safe on its own: the sampler calls it from the training thread only.
    """

    def __init__(self, num_classes: int, dim: int, capacity: int, normalize: bool):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
                or capacity <= 0:
            raise ValueError(f"fresh-rows capacity must be a positive integer, got "
                             f"{capacity!r}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.capacity = int(min(capacity, num_classes))
        self.normalize = bool(normalize)
        self._slot = np.full(self.num_classes, -1, dtype=np.int64)  # class id -> slot
        self._ids = np.empty(self.capacity, dtype=np.int64)
        self._rows = np.empty((self.capacity, self.dim), dtype=np.float32)
        self._step = np.empty(self.capacity, dtype=np.int64)
        self._dev = None  # a copy of _rows on an accelerator (to()), kept in step
        self.size = 0

    def to(self, device) -> "FreshRows":
        """Search on ``device`` (a torch device; the features'): on an accelerator the rows
        are mirrored there once and then only the rows noted each step travel, so the
        per-step ``(B, n)`` scores and their top-k never touch the host. ``None`` or a CPU
        device: search the host copy (the default)."""
        import torch

        device = None if device is None else torch.device(device)
        if device is None or device.type == "cpu":
            self._dev = None
        elif self._dev is None or self._dev.device != device:
            self._attach(device)
        return self

    def _attach(self, device) -> None:
        """Mirror the rows on ``device`` (any torch device: the tests mirror on the CPU)."""
        import torch

        self._dev = torch.from_numpy(self._rows).to(device, copy=True)

    def _mirror(self, slots: np.ndarray) -> None:
        """Copy the host rows of ``slots`` to the accelerator copy (if any)."""
        if self._dev is not None and slots.size:
            import torch

            idx = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64))
            self._dev[idx.to(self._dev.device)] = \
                torch.from_numpy(self._rows[slots]).to(self._dev.device)

    @property
    def full(self) -> bool:
        """Whether every slot is taken (rows noted beyond this are not kept)."""
        return self.size >= self.capacity

    def ids(self) -> np.ndarray:
        """The class ids kept now (a copy)."""
        return self._ids[:self.size].copy()

    def contains(self, class_ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``class_ids`` (any shape; negatives allowed) are kept."""
        class_ids = np.asarray(class_ids, dtype=np.int64)
        out = np.zeros(class_ids.shape, dtype=bool)
        ok = (class_ids >= 0) & (class_ids < self.num_classes)
        out[ok] = self._slot[class_ids[ok]] >= 0
        return out

    def values(self, class_ids: np.ndarray) -> np.ndarray:
        """The kept values (as stored: normalised for cosine) of ``class_ids``, all kept."""
        class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        kept = self.contains(class_ids)
        if not kept.all():
            raise KeyError(f"class ids not kept as fresh rows: {class_ids[~kept][:10].tolist()}")
        return self._rows[self._slot[class_ids]].copy()

    def note(self, class_ids: np.ndarray, rows: np.ndarray, step: int) -> int:
        """Keep ``rows`` (S, D) as the values of ``class_ids`` (S,, unique) at ``step``.

        Ids already kept are overwritten; new ones take free slots while any are left.
        Returns how many new ids could not be kept (the store is full).
        """
        class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape != (class_ids.size, self.dim):
            raise ValueError(f"fresh rows must have shape ({class_ids.size}, {self.dim}), got "
                             f"{tuple(rows.shape)}")
        if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= self.num_classes):
            raise ValueError(f"fresh row ids must lie in [0, {self.num_classes}), got "
                             f"{int(class_ids.min())}..{int(class_ids.max())}")
        if self.normalize:
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows / np.maximum(norms, 1e-12)
        slots = self._slot[class_ids]
        old = slots >= 0
        self._rows[slots[old]] = rows[old]
        self._step[slots[old]] = step
        new = np.flatnonzero(~old)
        take = new[:max(0, self.capacity - self.size)]
        s = np.arange(self.size, self.size + take.size)
        if take.size:
            self._slot[class_ids[take]] = s
            self._ids[s] = class_ids[take]
            self._rows[s] = rows[take]
            self._step[s] = step
            self.size += take.size
        self._mirror(np.concatenate([slots[old], s]))
        return int(new.size - take.size)

    def drop_before(self, step: int | None) -> int:
        """Forget the rows kept before ``step`` (the current index's snapshot step holds
        them); returns how many were dropped. ``None`` (no index) drops nothing."""
        if step is None or self.size == 0:
            return 0
        keep = self._step[:self.size] >= step
        n_keep = int(keep.sum())
        if n_keep == self.size:
            return 0
        self._slot[self._ids[:self.size][~keep]] = -1
        for arr in (self._ids, self._rows, self._step):
            arr[:n_keep] = arr[:self.size][keep]
        self._slot[self._ids[:n_keep]] = np.arange(n_keep)
        if self._dev is not None:  # the same compaction on the device: nothing travels
            import torch

            kept = torch.from_numpy(np.flatnonzero(keep)).to(self._dev.device)
            self._dev[:n_keep] = self._dev[kept]
        dropped, self.size = self.size - n_keep, n_keep
        return dropped

    def clear(self) -> None:
        """Forget everything."""
        self._slot[self._ids[:self.size]] = -1
        self.size = 0

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` kept rows of each (prepared) query: ``(ids, scores)``, (B, k);
        padded with id -1 and score -inf when fewer than k rows are kept.

        torch's matmul and ``topk`` (:func:`~hfsoftmax.samplers.exact.chunked_topk`, on
        torch's CPU threads): numpy's ``argpartition`` over the (B, n) scores cost more than
        the matmul itself (27 ms against ``torch.topk``'s 1.5 ms at B=64, n=10,000, k=6);
        the whole search against numpy's: ``benchmarks/fresh_rows.py``."""
        b = queries.shape[0]
        ids = np.full((b, k), -1, dtype=np.int64)
        scores = np.full((b, k), -np.inf, dtype=np.float32)
        n = self.size
        if n == 0 or k <= 0:
            return ids, scores
        import torch

        from .exact import chunked_topk
        rows = torch.from_numpy(self._rows[:n]) if self._dev is None else self._dev[:n]
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(rows.device)
        with torch.no_grad():
            top_s, top_i = chunked_topk(q, rows, k)
        kk = top_s.shape[1]
        ids[:, :kk] = self._ids[top_i.cpu().numpy()]
        scores[:, :kk] = top_s.cpu().numpy()
        return ids, scores


def merge_topk(ids_a: np.ndarray, scores_a: np.ndarray, ids_b: np.ndarray,
               scores_b: np.ndarray, k: int) -> np.ndarray:
    """Per row, the ``k`` ids of highest score from two (B, ka) / (B, kb) candidate lists
    (id -1 = padding, never chosen over a real id), best first; -1 pads the rest."""
    ids = np.concatenate([ids_a, ids_b], axis=1)
    scores = np.concatenate([scores_a, scores_b], axis=1).astype(np.float32, copy=True)
    scores[ids < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(ids, order, axis=1)
    out[np.take_along_axis(scores, order, axis=1) == -np.inf] = -1
    return out
