"""An index kept in this process: the current built index, rebuilt in the background.

:class:`IndexHandle` is what the sampler (:mod:`~hfsoftmax.samplers.selector`) and the index
process (:mod:`~hfsoftmax.samplers._index_child`) hold: one :class:`~hfsoftmax.samplers.
index.Index` backend and the index it built last. A rebuild reads the rows (``rows`` may be
an array or a callable that reads the row store in chunks; the callable runs on the rebuild
thread, so it must not share a non-thread-safe socket with the training thread), builds a
new index (annoy, hnswlib and faiss release the GIL while building) and swaps it in with a
single reference assignment under a lock. :meth:`IndexHandle.search` only takes that lock to
read the reference, so a query never waits for a rebuild.

:class:`~hfsoftmax.samplers.process.ProcessIndexHandle` has the same interface with the
index in its own process; both report their state as an :class:`IndexStatus`.
:class:`HandleState` is the state and error handling that :class:`IndexHandle` and the
device sampler's copy of the rows (:class:`~hfsoftmax.samplers.device_rows.DeviceRows`)
share.

>>> handle = IndexHandle(build_index("faiss", num_classes, dim, metric="cosine"))
>>> handle.start_rebuild(rowstore.reader(), step=0)
>>> handle.wait()
>>> ids = handle.search(features, k=10)
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Union

import numpy as np

from .index import Index

__all__ = ["HandleState", "IndexHandle", "IndexStatus", "RowsSource", "rebuild_failed"]

logger = logging.getLogger(__name__)

RowsSource = Union[np.ndarray, Callable[[], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class IndexStatus:
    """A handle's state at one moment: whether an index answers, the training step whose
    rows it holds, whether a rebuild runs, how many rebuilds finished and the last one's
    seconds (read + build) and read seconds. Crosses the index-process pipe as a dict."""

    has_index: bool = False
    index_step: int | None = None
    rebuilding: bool = False
    rebuilds: int = 0
    last_rebuild_s: float | None = None
    last_read_s: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexStatus":
        """The status a reply carries; ValueError if a field is missing."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"index status is missing {', '.join(missing)}: got {sorted(d)}")
        return cls(**{n: d[n] for n in names})


def rebuild_failed(name: str, err: BaseException) -> RuntimeError:
    """The error a failed background rebuild is raised as on the training thread (raise it
    ``from err``)."""
    return RuntimeError(f"{name} sampler: the background index rebuild failed: {err!r}")


class HandleState:
    """The state and error handling every in-process handle shares: :class:`IndexHandle`
    and :class:`~hfsoftmax.samplers.device_rows.DeviceRows` (its device copy of the rows).

    Written once so both report their state (:meth:`status`) and surface a failed
    background rebuild (:meth:`wait`, :meth:`raise_error`) the same way. A subclass sets
    ``name``, says what it holds now (:meth:`_held`: the built index, or the copy) and
    swaps it, with ``_step``, ``rebuilds`` and the timings, under ``_lock``; it starts its
    background work with :meth:`_start_thread`, which keeps the error for the training
    thread. ``_log`` is the logger the failure is reported to (the subclass's module's).
    """

    name: str
    _log = logger

    def __init__(self):
        self._lock = threading.Lock()
        self._step: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        #: finished rebuilds, and the last one's seconds (read + build) and read seconds
        self.rebuilds = 0
        self.last_rebuild_s: float | None = None
        self.last_read_s: float | None = None

    def _held(self) -> Any:
        """What answers queries now (the built index, or the copy); None without one."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    @property
    def has_index(self) -> bool:
        """Whether an index (or a copy of the rows) is ready to query."""
        return self._held() is not None

    @property
    def index_step(self) -> int | None:
        """The training step whose rows the current index holds (the last refresh read);
        None without one."""
        return self._step

    @property
    def rebuilding(self) -> bool:
        """Whether a background rebuild is running."""
        t = self._thread
        return t is not None and t.is_alive()

    def status(self) -> IndexStatus:
        """All of the state at once (the index, its step and its timings read together)."""
        rebuilding = self.rebuilding
        with self._lock:  # what one swap set, read together
            return IndexStatus(self._held() is not None, self._step, rebuilding, self.rebuilds,
                               self.last_rebuild_s, self.last_read_s)

    # ------------------------------------------------------------------ background work
    def _start_thread(self, work: Callable[[], Any], thread_name: str, what: str) -> None:
        """Run ``work`` on a daemon thread; an exception it raises is logged (``"<name>
        sampler: background <what> failed"``) and kept for :meth:`raise_error`."""
        def run():
            try:
                work()
            except BaseException as exc:  # surfaced on the training thread
                self._log.exception("%s sampler: background %s failed", self.name, what)
                self._error = exc

        self._thread = threading.Thread(target=run, name=thread_name, daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for a running rebuild, raising nothing; True if none runs any more."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return not self.rebuilding

    def wait(self, timeout: float | None = None) -> bool:
        """:meth:`join`, then raise a failed rebuild's error."""
        done = self.join(timeout)
        self.raise_error()
        return done

    def take_error(self) -> BaseException | None:
        """The error of a failed background rebuild (then forgotten), or None."""
        err, self._error = self._error, None
        return err

    def raise_error(self) -> None:
        """Raise the error of a failed background rebuild, if any (once)."""
        err = self.take_error()
        if err is not None:
            raise rebuild_failed(self.name, err) from err


class IndexHandle(HandleState):
    """One :class:`~hfsoftmax.samplers.index.Index` backend and the index it built last,
    swapped atomically; rebuilds on a daemon thread (:meth:`start_rebuild`) or here
    (:meth:`rebuild`). A failed background rebuild is kept and raised by the next
    :meth:`start_rebuild`, :meth:`wait` or :meth:`raise_error` (or handed over by
    :meth:`take_error`); the old index keeps answering."""

    def __init__(self, backend: Index):
        if not isinstance(backend, Index):
            raise TypeError(f"an IndexHandle holds an Index backend, got {backend!r}")
        super().__init__()
        #: the backend, whose options (``nprobe``, ``ntrees``, ...) the sampler reads through
        self.backend = backend
        self.name = backend.name
        self._built: Any = None          # swapped atomically under _lock, with _step

    # ------------------------------------------------------------------ what it indexes
    @property
    def num_classes(self) -> int:
        return self.backend.num_classes

    @property
    def dim(self) -> int:
        return self.backend.dim

    @property
    def metric(self) -> str:
        return self.backend.metric

    @property
    def mips(self) -> str:
        """The MIPS mode the backend applies (``"native"`` where it does not apply)."""
        return self.backend.mips

    # ------------------------------------------------------------------ state
    def _held(self) -> Any:
        return self._built

    def stats(self) -> dict:
        """Figures only this kind of handle has (none in process)."""
        return {}

    # ------------------------------------------------------------------ rebuilds
    def rebuild(self, rows: RowsSource, step: int) -> float:
        """Read ``rows``, build an index from them here and swap it in; returns seconds."""
        t0 = time.perf_counter()
        raw = rows() if callable(rows) else rows
        t_read = time.perf_counter() - t0
        built = self.backend.build(self.backend.prepare_rows(raw))
        del raw
        elapsed = time.perf_counter() - t0
        with self._lock:  # the swap: one reference assignment
            self._built, self._step = built, int(step)
            self.last_rebuild_s, self.last_read_s = elapsed, t_read
            self.rebuilds += 1
        logger.info("%s sampler: index over %d classes rebuilt from the rows of step %d in "
                    "%.2f s (read %.2f s)", self.name, self.num_classes, step, elapsed, t_read)
        return elapsed

    def start_rebuild(self, rows: RowsSource, step: int) -> bool:
        """Start a rebuild on a daemon thread; False if one is already running.

        Queries keep using the old index until the new one is swapped in.
        """
        self.raise_error()
        if self.rebuilding:
            logger.debug("%s sampler: rebuild still running, not starting another", self.name)
            return False
        self._start_thread(lambda: self.rebuild(rows, step), f"{self.name}-index-rebuild",
                           "rebuild")
        return True

    # ------------------------------------------------------------------ queries
    def search(self, features: np.ndarray, k: int, scored: bool = False):
        """The backend's :meth:`~hfsoftmax.samplers.index.Index.search` (``scored``:
        ``search_scored``) of raw (B, dim) float32 features in the current index; raises
        RuntimeError while there is none."""
        with self._lock:
            built = self._built
        if built is None:
            raise RuntimeError(f"{self.name} sampler has no index yet: call rebuild(rows) or "
                               "maybe_rebuild(step, read_rows) first")
        queries = self.backend.prepare_queries(features)
        if scored:
            return self.backend.search_scored(built, queries, k)
        return self.backend.search(built, queries, k)

    def close(self, timeout: float | None = None) -> None:
        """Wait for a running rebuild (a daemon thread) and drop the index."""
        self.join(timeout)
        with self._lock:
            self._built, self._step = None, None

    def __repr__(self):
        return f"IndexHandle({self.backend!r})"
