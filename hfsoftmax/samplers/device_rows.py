"""A copy of all classifier rows on the training device, for exact selection there.

HF-Softmax (Zhang et al., AAAI 2018) asks an ANN index over the rows for each batch's
nearest classes because the paper's trainer searched on the host. On a GPU the rows fit the
device (1M x 512 in float16 is 1 GB) and one ``(B, D) x (D, N)`` product with a top-k is a
few milliseconds there, exact, and needs no index build; what costs is the host: a 256-query
ANN search, the features' copy out and the sync it forces. :class:`DeviceRows` keeps the
copy on the device and has the index handle's interface (``handle.py``: ``has_index``,
``rebuild``, ``start_rebuild``, ``wait``, ``search``, ...), so the sampler's interval policy
(``selector.py``) drives it unchanged:

* a **refresh** reads all rows from the row store (``rows`` as for an index rebuild: an
  array, or ``rowstore.reader()``) into a second buffer, in chunks through pinned memory
  on a side CUDA stream, on a daemon thread; the training thread swaps it in (one reference
  assignment under a lock) at its next call, never waiting for it;
* **notes**: each step the sampled head hands the rows it just changed (``note``, from the
  push hook); they are written into the copy in place, so the copy is never stale. Rows
  noted while a refresh is reading are marked and carried from the old buffer into the new
  one at the swap (the store was read before or during their update);
* **search**: chunked matmul + top-k (:func:`~hfsoftmax.samplers.exact.chunked_topk`) over
  the copy; scores in float32 (half-precision rows are multiplied into float32 on CUDA).

Rows and queries are L2-normalised for the cosine metric (on the CPU with
:func:`~hfsoftmax.samplers.index.normalize`, bit for bit the index backends' own, so the
copy selects exactly what the ``exact`` backend does; elsewhere with torch). The copy holds
``num_classes x dim`` values of ``dtype`` (float16 for cosine and bfloat16 for ``ip`` on
CUDA, float32 elsewhere), twice while a refresh runs. Where that does not fit the device,
allocation fails with an error naming the sizes: use an ANN sampler (sharding the copy over
the ranks is not implemented).

>>> rows = DeviceRows(num_classes, dim, metric="cosine")     # on cuda if there is one
>>> rows.rebuild(rowstore.reader(), step=0)
>>> scores, ids = rows.topk(features, k=40)                  # tensors on the copy's device
"""
from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch

from .handle import HandleState, RowsSource
from .index import check_table, normalize

__all__ = ["DeviceRows", "resolve_dtype", "to_device"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device, metric: str) -> torch.dtype:
    """The copy's dtype: ``dtype`` (a name or torch dtype) or, for None, float16 for cosine
    (unit vectors: float16's 10-bit mantissa beats bfloat16's 7) and bfloat16 for ``ip``
    (rows and features of any norm: float32's range) on CUDA, float32 elsewhere."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if metric == "cosine" else torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"Unknown dtype {dtype!r} for the device copy. Valid: float32, float16, "
                     "bfloat16 (or None: float16/bfloat16 on CUDA, float32 elsewhere)")


def _scores_fp32(queries: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``queries @ block.T`` in float32: half-precision inputs are multiplied into float32
    on CUDA (``torch.mm(..., out_dtype=)``), so near-equal logits are not rounded together."""
    if queries.dtype == torch.float32:
        return queries @ block.T
    try:
        return torch.mm(queries, block.T, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # an older torch, or the CPU
        return (queries @ block.T).float()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; a host tensor goes to a GPU through pinned memory without
    blocking the host (the caching host allocator keeps the pinned block until the copy is
    done)."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class DeviceRows(HandleState):
    """All rows of a table, normalised (cosine) and cast to ``dtype``, on ``device``; see the
    module docstring. ``device=None``: the current CUDA device when the first copy is
    loaded, else the CPU. ``chunk_rows``: rows scored per matmul (bounds the (B, chunk)
    float32 scores: 64 MB at B=256 and the default 65536). ``load_rows``: rows per pinned
    transfer of a refresh. Its state, waits and errors are :class:`~hfsoftmax.samplers.
    handle.HandleState`'s; ``index_step`` is the step the last refresh read (noted rows are
    newer)."""

    name = "device"
    mips = "native"  # exact scores: the MIPS reduction never applies
    _log = logger

    def __init__(self, num_classes: int, dim: int, *, metric: str = "ip", device=None,
                 dtype=None, chunk_rows: int = 65536, load_rows: int = 32768):
        check_table(num_classes, dim, metric)
        for name, v in (("chunk_rows", chunk_rows), ("load_rows", load_rows)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.num_classes, self.dim, self.metric = int(num_classes), int(dim), metric
        self.normalize = metric == "cosine"
        self.chunk_rows, self.load_rows = int(chunk_rows), int(load_rows)
        self._device = None if device is None else torch.device(device)
        self._dtype_opt = dtype
        if self._device is not None:
            resolve_dtype(dtype, self._device, metric)  # an unknown dtype fails here
            self._check_fits(self.device)
        elif dtype is not None:
            resolve_dtype(dtype, torch.device("cpu"), metric)
        super().__init__()  # _lock guards the copy, the swap and the marks of noted rows
        self._rows: torch.Tensor | None = None
        self._pending = None     # (buffer, step, seconds, read seconds) awaiting the swap
        self._touched: torch.Tensor | None = None  # rows noted while a refresh reads
        self._dropped = False    # a row was noted while there was no copy to write it to
        self._stale = False      # the copy misses such rows: refresh early (``full``)

    # ------------------------------------------------------------------ where, and how big
    @property
    def device(self) -> torch.device:
        """The copy's device (resolved on first use when not given)."""
        if self._device is None:
            self._device = (torch.device("cuda", torch.cuda.current_device())
                            if torch.cuda.is_available() else torch.device("cpu"))
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self._dtype_opt, self.device, self.metric)

    @property
    def copy_bytes(self) -> int:
        """Bytes of one copy (a refresh holds two)."""
        return self.num_classes * self.dim * torch.empty((), dtype=self.dtype).element_size()

    def _too_big(self, free: int | None) -> str:
        gb = self.copy_bytes / 2**30
        have = "" if free is None else f"; {self.device} has {free / 2**30:.2f} GB free"
        return (f"the device sampler's copy of {self.num_classes} x {self.dim} rows in "
                f"{str(self.dtype).replace('torch.', '')} needs {gb:.2f} GB, and a refresh "
                f"holds two ({2 * gb:.2f} GB){have}. Use a half-precision dtype "
                "(dtype='float16'), or an ANN sampler (faiss, hnsw, annoy) for a table this "
                "large: sharding the copy over the ranks is not implemented yet")

    def _check_fits(self, device: torch.device) -> None:
        """ValueError now if one copy exceeds the device's whole memory (CUDA only)."""
        if device.type == "cuda":
            _, total = torch.cuda.mem_get_info(device)
            if self.copy_bytes > total:
                raise ValueError(self._too_big(None) + f" ({device} holds "
                                 f"{total / 2**30:.2f} GB in all)")

    def _alloc(self) -> torch.Tensor:
        try:
            return torch.empty((self.num_classes, self.dim), dtype=self.dtype,
                               device=self.device)
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as exc:
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" \
                else None
            raise MemoryError(self._too_big(free)) from exc

    # ------------------------------------------------------------------ handle state
    def _held(self) -> torch.Tensor | None:
        return self._rows

    def stats(self) -> dict:
        return {"device": str(self.device), "device_dtype": str(self.dtype).replace("torch.", ""),
                "device_copy_mb": round(self.copy_bytes / 2**20, 1)}

    # ------------------------------------------------------------------ what the sampler's
    # fresh-rows hooks ask (``selector.py``): every row is fresh, none is ever dropped
    @property
    def full(self) -> bool:
        """True when the copy misses rows noted while no copy existed (the first refresh
        was still reading): the sampler's policy then refreshes early."""
        return self._stale

    @property
    def size(self) -> int:
        return self.num_classes if self._rows is not None else 0

    def drop_before(self, step) -> int:
        return 0

    def clear(self) -> None:
        """Nothing to forget: the copy is dropped by :meth:`close`."""

    # ------------------------------------------------------------------ refreshes
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 rows or queries as the copy compares them: normalised for cosine, cast."""
        x = x.detach().float()
        if self.normalize:
            if x.device.type == "cpu":  # bit for bit the index backends' normalisation
                x = torch.from_numpy(normalize(np.ascontiguousarray(x.numpy())))
            else:
                x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
        return x.to(self.dtype)

    def _read(self, rows: RowsSource) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        raw = rows() if callable(rows) else rows
        raw = np.ascontiguousarray(raw, dtype=np.float32)
        if raw.shape != (self.num_classes, self.dim):
            raise ValueError(f"rows must have shape (num_classes, dim) = ({self.num_classes}, "
                             f"{self.dim}), got {tuple(raw.shape)}")
        if not np.isfinite(raw).all():
            raise FloatingPointError("the classifier rows contain NaN or Inf; the device copy "
                                     "cannot be refreshed (did training diverge?)")
        return raw, time.perf_counter() - t0

    def _fill(self, raw: np.ndarray) -> torch.Tensor:
        """A new copy of ``raw``, written in ``load_rows`` chunks; on CUDA through pinned
        memory on a side stream, waited for here (the reader thread), never by training."""
        buf = self._alloc()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None
                               else contextlib.nullcontext()):
            for start in range(0, self.num_classes, self.load_rows):
                block = torch.from_numpy(raw[start:start + self.load_rows])
                buf[start:start + block.shape[0]] = self._prepare(to_device(block, self.device))
        if stream is not None:
            stream.synchronize()
        return buf

    def _begin(self) -> None:
        """A refresh starts reading: mark the rows noted from now on. (The device is
        resolved here, on the caller's thread: CUDA's current device is per thread.)"""
        self.device
        self.swap_ready()
        with self._lock:
            self._touched = (torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
                             if self._rows is not None else None)
            self._dropped = self._stale = False

    def _load(self, rows: RowsSource, step: int) -> None:
        t0 = time.perf_counter()
        raw, t_read = self._read(rows)
        buf = self._fill(raw)
        del raw
        with self._lock:
            self._pending = (buf, int(step), time.perf_counter() - t0, t_read)

    def swap_ready(self) -> bool:
        """Swap in a finished refresh (training thread); True if one was swapped. Rows noted
        while it read are carried over from the old copy."""
        if self._pending is None:
            return False
        with self._lock, torch.no_grad():
            pending, self._pending = self._pending, None
            if pending is None:
                return False
            buf, step, elapsed, t_read = pending
            old, touched = self._rows, self._touched
            if old is not None and touched is not None:
                # note: a CPU-GPU sync, once per refresh (not per step)
                idx = touched.nonzero().squeeze(1)
                if idx.numel():
                    buf.index_copy_(0, idx, old.index_select(0, idx))
            elif self._dropped:
                self._stale = True  # rows changed that this copy read before their update
            self._rows, self._step, self._touched = buf, step, None
            self.last_rebuild_s, self.last_read_s = elapsed, t_read
            self.rebuilds += 1
        logger.info("device sampler: copy of %d x %d rows (%s on %s) refreshed from the rows "
                    "of step %d in %.2f s (read %.2f s)", self.num_classes, self.dim,
                    self.dtype, self.device, step, elapsed, t_read)
        return True

    def rebuild(self, rows: RowsSource, step: int) -> float:
        """Refresh the copy here, now; returns seconds."""
        self.raise_error()
        self.join()
        self._begin()
        self._load(rows, step)
        self.swap_ready()
        return self.last_rebuild_s

    def start_rebuild(self, rows: RowsSource, step: int) -> bool:
        """Refresh on a daemon thread; False if one is running. Selection keeps using the
        current copy (and noting rows into it) until the swap."""
        self.raise_error()
        if self.rebuilding:
            return False
        self._begin()
        self._start_thread(lambda: self._load(rows, step), "device-rows-refresh", "refresh")
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """:meth:`~hfsoftmax.samplers.handle.HandleState.wait`, then swap in the finished
        refresh."""
        done = super().wait(timeout)
        if done:
            self.swap_ready()
        return done

    def close(self, timeout: float | None = None) -> None:
        """Wait for a running refresh and free the copy."""
        self.join(timeout)
        with self._lock:
            self._rows = self._pending = self._touched = None
            self._step = None

    # ------------------------------------------------------------------ notes, search
    def note(self, class_ids, rows, step: int | None = None) -> None:
        """Write the new values of rows ``class_ids`` (unique) into the copy in place (any
        thread: the sampled head calls it from its push). numpy or tensors, anywhere."""
        ids = torch.as_tensor(np.asarray(class_ids, dtype=np.int64)
                              if not isinstance(class_ids, torch.Tensor) else class_ids)
        vals = torch.as_tensor(rows if isinstance(rows, torch.Tensor)
                               else np.asarray(rows, dtype=np.float32))
        ids = ids.reshape(-1)
        if vals.shape != (ids.shape[0], self.dim):
            raise ValueError(f"noted rows must have shape ({ids.shape[0]}, {self.dim}), got "
                             f"{tuple(vals.shape)}")
        with self._lock, torch.no_grad():
            if self._rows is None:
                self._dropped = True
                return
            dev = self._rows.device
            ids = to_device(ids.long(), dev)
            self._rows.index_copy_(0, ids, self._prepare(to_device(vals, dev)))
            if self._touched is not None:
                self._touched[ids] = True

    def prepare_queries(self, features) -> torch.Tensor:
        """Features (a tensor anywhere, or an array) as queries on the copy's device."""
        x = features if isinstance(features, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(features, dtype=np.float32))
        return self._prepare(to_device(x.detach(), self.device))

    def topk(self, features, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, ids)``, (B, min(k, N)) float32 / int64 on the copy's device, best
        first: the exact top-k of the (prepared) features against the copy. No host sync."""
        rows = self._rows
        if rows is None:
            raise RuntimeError("the device sampler has no copy of the rows yet: call "
                               "rebuild(rows) or maybe_rebuild(step, read_rows) first")
        from .exact import chunked_topk
        with torch.no_grad():
            return chunked_topk(self.prepare_queries(features), rows, k, self.chunk_rows,
                                matmul=_scores_fp32)

    def search(self, features, k: int, scored: bool = False):
        """The handle's query: (B, k) int64 ids on the host (and float32 scores)."""
        scores, ids = self.topk(features, k)
        ids = ids.cpu().numpy()
        return (ids, scores.cpu().numpy()) if scored else ids

    def values(self) -> torch.Tensor:
        """The current copy (the tensor itself: read, do not write)."""
        self.swap_ready()
        if self._rows is None:
            raise RuntimeError("the device sampler has no copy of the rows yet")
        return self._rows

    def __repr__(self):
        dev = self._device if self._device is not None else "auto"
        return (f"DeviceRows(num_classes={self.num_classes}, dim={self.dim}, "
                f"metric={self.metric!r}, device={dev}, chunk_rows={self.chunk_rows})")
