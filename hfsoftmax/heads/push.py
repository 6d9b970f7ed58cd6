"""The sampled head's row store on one worker thread, so its pushes overlap the backbone;
and the head's host/device transfers that do not make the host wait (pinned memory,
non-blocking copies, CUDA events).

:class:`ThreadedRowStore` wraps a row store: every call (pull, push, set_lr, snapshot,
restore, reads) runs on its single worker thread, in the order made, so all socket and
fresh-row work happens on that one thread (a ZeroMQ socket must not be shared between
threads). The sampled head submits its push there without waiting
(:meth:`ThreadedRowStore.submit`: the row gradient already copied into pinned host memory)
and the backbone's backward runs meanwhile; the head's next forward waits for the push's
acknowledgement (:meth:`wait`) before it selects and pulls, and so does every other call,
so a synchronous-SGD step sees exactly the rows it would have seen without the thread
(tested bitwise: tests/test_split_step.py).

Under ``torch.distributed`` a push that all-reduces (the in-process store averages the ranks'
gradients) must not run beside the backbone's DDP collectives on another thread, whose order
would then differ between ranks: :attr:`async_push` is False there and the head pushes in
its hook as before. With a parameter server the pushes need no collective (the server
averages); the fresh rows' mean gradient is all-reduced in the hook, before the backbone's
backward starts.

>>> store = ThreadedRowStore(build_row_store(...))
>>> head.rowstore = store          # the head's hook now submits its push to the thread
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .. import distributed as hd

__all__ = ["ThreadedRowStore", "host_copy", "host_array", "host_inputs", "to_device"]

logger = logging.getLogger(__name__)


def host_copy(t):
    """``(float32 copy of t on the host, event or None)``: on a GPU into pinned memory with
    a non-blocking copy and a CUDA event the reader waits on (the host does not wait here);
    on the CPU a plain copy."""
    t = t.detach()
    if t.is_cuda:
        buf = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event
    return t.to(torch.float32, copy=True), None


def host_inputs(features: torch.Tensor, labels: torch.Tensor):
    """The selection's inputs on the host: the labels copied first without waiting, then
    the features (note: the step's one host sync on a GPU; it also completes the labels'
    copy, queued before it on the same stream)."""
    lab = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=labels.is_cuda)
    lab.copy_(labels, non_blocking=True)
    return features.detach().float().cpu(), lab


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None):
    """A host tensor on ``device`` (as ``dtype``): from pinned memory without blocking the
    host on a GPU; on the CPU no copy where none is needed."""
    if device.type == "cuda" and not t.is_cuda:
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def host_array(x):
    """numpy from what a push gets: an array, or ``(host tensor, CUDA event or None)``."""
    if x is None or isinstance(x, np.ndarray):
        return x
    buf, event = x
    if event is not None:
        event.synchronize()     # the push thread waits for the copy, not the host
    return buf.numpy()


class ThreadedRowStore:
    """A row store (``inner``) whose calls all run on one worker thread; see the module
    docstring. Attributes other than the store's methods (``name``, ``num_rows``, ``dim``,
    ``table``, ...) are the inner store's. ``reader()`` is the inner store's too: a rebuild
    reads over its own connection, on its own thread, and must not queue behind pushes."""

    def __init__(self, inner):
        from ..rowstore import LocalRowStore

        self.inner = inner
        # the worker thread works on this thread's CUDA device (the current device is per
        # thread: a new one starts on cuda:0, wrong for every rank but the first)
        cuda_dev = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="rowstore",
            initializer=None if cuda_dev is None else torch.cuda.set_device,
            initargs=() if cuda_dev is None else (cuda_dev,))
        self._last: Future | None = None
        #: whether the head may submit pushes without waiting (see the module docstring)
        self.async_push = not (hd.is_dist() and isinstance(inner, LocalRowStore))

    def __getattr__(self, name):
        if name in ("inner", "_pool", "_last"):  # not set yet (during unpickling, say)
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- the thread ------------------------------------------------------------------
    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on the worker thread after everything submitted before; do not
        wait. Its error is raised by the next :meth:`wait` (or any other call)."""
        self._last = self._pool.submit(fn, *args)
        return self._last

    def wait(self) -> None:
        """Wait for the last submitted job; raise its error (once)."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def _call(self, name: str, *args, **kwargs):
        self.wait()
        return self._pool.submit(getattr(self.inner, name), *args, **kwargs).result()

    # -- the row store's interface, each call on the thread -------------------------------
    def pull(self, rows):
        return self._call("pull", rows)

    def push(self, rows, grads):
        return self._call("push", rows, grads)

    def read_range(self, start: int, stop: int):
        return self._call("read_range", start, stop)

    def iter_chunks(self, chunk_rows: int = 65536):
        for start in range(0, self.inner.num_rows, chunk_rows):
            yield start, self.read_range(start, min(start + chunk_rows, self.inner.num_rows))

    def read_all(self, chunk_rows: int = 65536):
        return self._call("read_all", chunk_rows)

    def reader(self, chunk_rows: int = 65536):
        return self.inner.reader(chunk_rows)

    def set_lr(self, lr: float) -> None:
        self._call("set_lr", lr)

    def set_rows(self, rows, values) -> None:
        self._call("set_rows", rows, values)

    def info(self) -> dict:
        return self._call("info")

    def snapshot(self, path) -> None:
        self._call("snapshot", path)

    def restore(self, path) -> None:
        self._call("restore", path)

    def delete_snapshot(self, path) -> None:
        self._call("delete_snapshot", path)

    def close(self) -> None:
        """Wait for the last push, close the inner store on its thread, end the thread."""
        try:
            self._call("close")
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
