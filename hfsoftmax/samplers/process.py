"""Run a sampler's index in its own process, so the trainer never holds W or the index.

:class:`ProcessSampler` (``build_sampler(name, ..., process=True)``) is a
:class:`~hfsoftmax.samplers.selector.ClassSampler` whose index handle is a
:class:`ProcessIndexHandle`: the same interface as the in-process
:class:`~hfsoftmax.samplers.handle.IndexHandle`, proxied to an index process. So
:class:`~hfsoftmax.heads.SampledHead` uses it unchanged, and the split is:

* **trainer side**: the rebuild policy (``interval``), the fresh rows and the selection rule
  (:func:`~hfsoftmax.samplers.selection.select_classes`, the one implementation, with the
  sampler's seeded RNG), so the process and in-process samplers select identically;
* **index process** (:mod:`~hfsoftmax.samplers._index_child`, a fresh interpreter, fork+exec:
  safe beside torch and threads, and unlike ``multiprocessing``'s spawn it never re-imports
  the trainer's ``__main__``): the backend (annoy, hnsw, faiss or exact) in an in-process
  handle. Queries and replies are ``paramserver/wire.py`` messages over a socketpair
  (:mod:`~hfsoftmax.samplers.pipe`); nothing is pickled, options travel as JSON. Every reply
  carries the child's :class:`~hfsoftmax.samplers.handle.IndexStatus`, which is all the
  trainer knows of the index.

Rebuilds run in the child: it reads the rows *itself* and builds the new index on a thread
while its main thread keeps answering queries from the old index, then swaps. Where the rows
come from (the ``rows`` argument of ``maybe_rebuild`` / ``start_rebuild`` / ``rebuild``):

* a :class:`~hfsoftmax.rowstore.ParamRowSource` (or its dict), or a reader carrying one as
  ``.row_source`` (what ``RemoteRowStore.reader()`` returns, so the sampled head needs no
  change): the child makes its own ``ParamClient`` to the server(s) and reads the table in
  chunks. The trainer holds neither W nor the index, not even during a rebuild.
* an ``(N, D)`` array, or any other callable returning one (``LocalRowStore.reader()``; the
  rows live in the trainer anyway): a trainer thread calls it, writes the rows to a temporary
  ``.npy`` file that the child loads and deletes. The trainer then holds one transient copy of
  W during the staging; the index is still only in the child.
* ``None``: the ``row_source`` given at construction.

Lifecycle: the child starts at construction (a backend error such as a missing package or an
unknown option is raised there, in the trainer, with the child's message); ``close()`` stops
it, and so do garbage collection and interpreter exit (``weakref.finalize``). If the trainer
dies, the child sees its pipe close (or its parent change) within a second and exits: no
orphan index process. A failed background rebuild in the child is raised in the trainer at
the next ``maybe_rebuild`` / ``wait_rebuild``, as in-process.

>>> sampler = build_sampler("faiss", N, 256, process=True, nprobe=1, interval=100)
>>> head = SampledHead(RemoteRowStore(client, "classifier"), sampler, sample_num=1000)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from . import pipe
from .handle import IndexStatus, rebuild_failed
from .index import check_table
from .rowsource import NpyRowSource, source_dict, stage_rows
from .selector import ClassSampler, check_policy

__all__ = ["ProcessSampler", "ProcessIndexHandle", "NpyRowSource", "IndexProcessError"]

logger = logging.getLogger(__name__)

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class IndexProcessError(RuntimeError):
    """The index process reported an error (its message and traceback are included) or died."""


def _shutdown(proc, conn, lock, timeout: float = 10.0) -> None:
    """Stop the index process: ask it, then terminate, then kill. Idempotent."""
    if lock.acquire(timeout=timeout):
        try:
            if proc.poll() is None and not conn.closed:
                try:
                    pipe.send(conn, {"op": "close"})
                    if conn.poll(timeout):
                        pipe.recv(conn)
                except (EOFError, OSError, ValueError):
                    pass
            if not conn.closed:
                conn.close()
        finally:
            lock.release()
    for stop in (None, proc.terminate, proc.kill):
        if proc.poll() is not None:
            break
        if stop is not None:
            stop()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


class ProcessIndexHandle:
    """An index backend (``annoy``, ``hnsw``, ``faiss``, ``exact``) in an index process, with
    the interface of :class:`~hfsoftmax.samplers.handle.IndexHandle`.

    ``metric``, ``seed``, ``mips`` and ``backend_opts`` (e.g. ``nprobe=1``) go to the backend
    in the child. ``row_source``: rows to read when a rebuild is given ``rows=None`` (a
    ``ParamRowSource``, ``NpyRowSource`` or their dict). ``threads``: OpenMP / torch threads
    of the child (None: their defaults). ``start_timeout_s``: how long the child may take to
    start; ``timeout_s``: how long one request may take (a query; a rebuild request only
    starts the build). ``tmp_dir``: where rows staged from the trainer are written.

    The state (``has_index``, ``index_step``, ``rebuilds``, ...) is the status of the last
    reply; :meth:`status` asks for a new one, and so do ``has_index`` while there is no index
    and ``rebuilding`` (the build may have finished since).
    """

    def __init__(self, backend: str, num_classes: int, dim: int, *, metric: str = "ip",
                 seed: int = 0, mips: str = "native", row_source: Any = None,
                 threads: int | None = None, start_timeout_s: float = 300.0,
                 timeout_s: float = 600.0, tmp_dir: str | None = None, **backend_opts):
        from .registry import index_backends
        if backend not in index_backends():
            raise ValueError(f"Unknown index backend {backend!r} for a process sampler. "
                             f"Valid: {', '.join(index_backends())} ('random' keeps no index: "
                             "use it in-process)")
        check_table(num_classes, dim, metric)
        self.name = f"{backend}-process"
        self.num_classes, self.dim, self.metric = int(num_classes), int(dim), metric
        self.row_source = None if row_source is None else source_dict(row_source)
        self.timeout_s = float(timeout_s)
        self.tmp_dir = tmp_dir
        self._status = IndexStatus()
        self._error: BaseException | None = None
        self._stage_thread: threading.Thread | None = None
        self._closed = False
        init = {"op": "init", "name": backend, "num_classes": self.num_classes,
                "dim": self.dim, "threads": threads,
                "opts": {"metric": metric, "seed": seed, "mips": mips, **backend_opts},
                "log_level": logging.getLogger().getEffectiveLevel()}
        try:
            json.dumps(init, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"process sampler options must be JSON values (numbers, "
                             f"strings, lists, dicts): {exc}") from None
        # fork+exec of a fresh interpreter (safe beside torch and threads, and unlike
        # multiprocessing's spawn it never re-imports the trainer's __main__)
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        if threads:
            env["OMP_NUM_THREADS"] = str(int(threads))
        with child_sock:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "hfsoftmax.samplers._index_child",
                 str(child_sock.fileno()), str(os.getpid())],
                pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL)
        self._conn = Connection(parent_sock.detach())
        self._rpc_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._conn,
                                           self._rpc_lock)
        try:
            pipe.send(self._conn, init)
            hello, _ = self._wait_reply(start_timeout_s, "start")
            if not hello.get("ok"):
                raise pipe.remote_error(hello, f"the {backend} index process failed to start",
                                        IndexProcessError)
        except BaseException:
            self.close()
            raise
        #: the index process's pid
        self.pid: int = int(hello["pid"])
        #: the MIPS mode the backend applies (from its reply)
        self.mips: str = hello["mips"]
        self._apply(hello)
        logger.info("%s: index process %d started (%d classes x %d)", self.name, self.pid,
                    self.num_classes, self.dim)

    # ------------------------------------------------------------------ transport
    def _wait_reply(self, timeout: float, what: str) -> tuple[dict, list]:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.5):
            if self._proc.poll() is not None:
                raise IndexProcessError(f"{self.name}: the index process (pid "
                                        f"{self._proc.pid}) died with exit code "
                                        f"{self._proc.returncode} during {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: the index process did not answer {what} "
                                   f"within {timeout:.0f} s")
        try:
            return pipe.recv(self._conn)
        except (EOFError, OSError) as exc:
            raise IndexProcessError(f"{self.name}: lost the index process during {what} "
                                    f"({exc!r})") from None

    def _call(self, header: dict, arrays=(), timeout: float | None = None):
        """Send one request and return ``(reply, arrays)``; raises the child's error."""
        with self._rpc_lock:
            if self._closed or self._conn.closed:
                raise RuntimeError(f"{self.name} is closed")
            try:
                pipe.send(self._conn, header, arrays)
            except (OSError, EOFError) as exc:
                raise IndexProcessError(f"{self.name}: cannot reach the index process "
                                        f"(exit code {self._proc.poll()}): {exc!r}") from None
            try:
                reply, data = self._wait_reply(self.timeout_s if timeout is None else timeout,
                                               header["op"])
            except TimeoutError:
                # the pipe is out of step now: this handle cannot be used any more
                self._closed = True
                self._conn.close()
                raise
        self._apply(reply)
        if not reply.get("ok"):
            raise pipe.remote_error(reply, f"{self.name}: {header['op']} failed in the index "
                                           "process", IndexProcessError)
        return reply, data

    def _apply(self, reply: dict) -> None:
        """Take the state a reply carries: the child's status, a failed rebuild's error."""
        if "status" in reply:
            self._status = IndexStatus.from_dict(reply["status"])
        if reply.get("rebuild_error"):
            self._error = IndexProcessError(f"{self.name}: rebuild in the index process "
                                            f"failed: {reply['rebuild_error']}")

    # ------------------------------------------------------------------ state
    def status(self) -> IndexStatus:
        """Ask the index process for its status (index step, rebuilding, timings)."""
        self._call({"op": "status"})
        return self._status

    @property
    def has_index(self) -> bool:
        """Whether the child has an index (asked again while it had none)."""
        if not self._status.has_index and not self._closed:
            self.status()
        return self._status.has_index

    @property
    def index_step(self) -> int | None:
        return self._status.index_step

    @property
    def rebuilding(self) -> bool:
        """Whether a rebuild is being staged here or runs in the index process."""
        t = self._stage_thread
        if t is not None and t.is_alive():
            return True
        if self._closed:
            return False
        return self.status().rebuilding

    @property
    def rebuilds(self) -> int:
        return self._status.rebuilds

    @property
    def last_rebuild_s(self) -> float | None:
        return self._status.last_rebuild_s

    @property
    def last_read_s(self) -> float | None:
        return self._status.last_read_s

    @property
    def alive(self) -> bool:
        """Whether the index process runs."""
        return self._proc.poll() is None

    def index_rss_mb(self) -> float | None:
        """Resident memory of the index process in MiB (None without psutil or process)."""
        try:
            import psutil
            return round(psutil.Process(self._proc.pid).memory_info().rss / 2**20, 1)
        except Exception:
            return None

    def stats(self) -> dict:
        """The index process's pid and resident memory."""
        return {"index_pid": self._proc.pid, "index_rss_mb": self.index_rss_mb()}

    # ------------------------------------------------------------------ queries
    def search(self, features: np.ndarray, k: int, scored: bool = False):
        """The child's search of raw (B, dim) float32 features (``scored``: ids and
        scores); RuntimeError while it has no index."""
        if not self.has_index:
            raise RuntimeError(f"{self.name} sampler has no index yet: call rebuild(rows) or "
                               "maybe_rebuild(step, read_rows) first")
        x = np.ascontiguousarray(features, dtype=np.float32)
        _, data = self._call({"op": "query", "k": int(k), "scores": bool(scored)}, [x])
        if scored:
            return data[0].copy(), data[1].copy()
        return data[0].copy()

    # ------------------------------------------------------------------ rebuilds
    def _source_for(self, rows) -> dict | None:
        """The spec the child reads by itself, or None when the rows go through a file."""
        if rows is None:
            if self.row_source is None:
                raise ValueError(f"{self.name}: rebuild got rows=None and the sampler has no "
                                 "row_source; pass rows, a reader or a ParamRowSource")
            return self.row_source
        if isinstance(rows, dict) or hasattr(rows, "to_dict"):
            return source_dict(rows)
        spec = getattr(rows, "row_source", None)  # RemoteRowStore.reader()
        return None if spec is None else source_dict(spec)

    def start_rebuild(self, rows, step: int) -> bool:
        """Start a rebuild in the index process; False if one is already running.

        ``rows``: see the module docstring (a row-source spec or a reader carrying one is
        read by the child itself; an array or callable is staged through a temporary file on
        a trainer thread).
        """
        self.raise_error()
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        if self.rebuilding:
            logger.debug("%s: rebuild still running, not starting another", self.name)
            return False
        spec = self._source_for(rows)
        if spec is not None:
            reply, _ = self._call({"op": "rebuild", "source": spec, "step": int(step)})
            return bool(reply["started"])

        def stage_and_send():
            try:
                self._call({"op": "rebuild", "step": int(step),
                            "source": stage_rows(rows, (self.num_classes, self.dim),
                                                 self.tmp_dir)})
            except BaseException as exc:  # surfaced on the training thread
                logger.exception("%s: staging the rows for a rebuild failed", self.name)
                self._error = exc

        self._stage_thread = threading.Thread(target=stage_and_send, daemon=True,
                                              name=f"{self.name}-stage-rows")
        self._stage_thread.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running rebuild; True if none is running any more. Raises the error
        of a failed one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        t = self._stage_thread
        if t is not None:
            t.join(timeout)
        while not self._closed:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                self.status()
                break
            self._call({"op": "wait", "timeout": left})
            if not self._status.rebuilding:
                break
        self.raise_error()
        return not self.rebuilding

    def rebuild(self, rows, step: int) -> float:
        """Synchronously (re)build the index in the index process; returns its seconds."""
        self.wait()
        self.start_rebuild(rows, step)
        self.wait()
        return float(self.last_rebuild_s or 0.0)

    def raise_error(self) -> None:
        """Raise the error of a failed rebuild (staging here or building there), once."""
        err, self._error = self._error, None
        if err is not None:
            raise rebuild_failed(self.name, err) from err

    def close(self, timeout: float | None = None) -> None:
        """Stop the index process (it is not waited for to finish a running build)."""
        t = self._stage_thread
        if t is not None:
            t.join(timeout)
        self._closed = True
        self._finalizer()
        self._status = dataclasses.replace(self._status, has_index=False, index_step=None,
                                           rebuilding=False)

    def __repr__(self):
        return (f"ProcessIndexHandle({self.name!r}, num_classes={self.num_classes}, "
                f"dim={self.dim}, metric={self.metric!r}, pid={self._proc.pid})")


class ProcessSampler(ClassSampler):
    """A :class:`~hfsoftmax.samplers.selector.ClassSampler` selecting by an index in its own
    process (:class:`ProcessIndexHandle`; ``backend`` its registered name).

    ``metric``, ``seed``, ``interval``, ``background``, ``neighbour_oversample``,
    ``random_share``, ``fresh_rows`` as for every sampler (checked before the child starts);
    the other options (``row_source``, ``threads``, ``timeout_s``, ``start_timeout_s``,
    ``tmp_dir``, ``mips``, the backend's) go to the handle.
    """

    def __init__(self, backend: str, num_classes: int, dim: int, *, metric: str = "ip",
                 seed: int = 0, interval: int = 100, background: bool = True,
                 neighbour_oversample: float = 1.25, random_share: float = 0.0,
                 fresh_rows: int = 0, **handle_opts):
        policy = {"interval": interval, "background": background, "random_share": random_share,
                  "neighbour_oversample": neighbour_oversample, "fresh_rows": fresh_rows}
        check_policy(**policy)
        handle = ProcessIndexHandle(backend, num_classes, dim, metric=metric, seed=seed,
                                    **handle_opts)
        try:
            super().__init__(num_classes, dim, metric=metric, seed=seed, index=handle, **policy)
        except BaseException:
            handle.close()
            raise
        self.backend = backend

    @property
    def pid(self) -> int:
        """The index process's pid."""
        return self.index.pid

    @property
    def alive(self) -> bool:
        """Whether the index process runs."""
        return self.index.alive

    def __repr__(self):
        return (f"ProcessSampler(backend={self.backend!r}, num_classes={self.num_classes}, "
                f"dim={self.dim}, metric={self.metric!r}, interval={self.interval}, "
                f"pid={self.pid})")
