"""Run a sampler's ANN index in its own process, so the trainer never holds W or the index.

:class:`ProcessSampler` (``build_sampler(name, ..., process=True)``) has the public API of the
in-process samplers (``select``, ``query``, ``maybe_rebuild``, ``rebuild``, ``start_rebuild``,
``wait_rebuild``, ``index_age``, ``last_rebuild_s``, ``stats()``, ``close()``), so
:class:`~hfsoftmax.heads.SampledHead` uses it unchanged. The split:

* **trainer side** (this object): the rebuild policy (``interval``) and the selection rule
  (:func:`~hfsoftmax.samplers.selection.select_classes`, the one implementation, with this
  object's seeded RNG), so the process and in-process samplers select identically;
* **index process** (a fresh interpreter, ``python -m hfsoftmax.samplers._index_child``,
  fork+exec: safe beside torch and threads, and unlike ``multiprocessing``'s spawn it never
  re-imports the trainer's ``__main__``): the backend sampler itself (annoy, hnsw, faiss or
  exact). It answers ``query`` requests: the trainer sends the (B, D) float32 features as raw
  bytes, the child replies with the (B, k) int64 neighbour ids as raw bytes (a JSON header
  frame and a raw frame per message over a socketpair wrapped in a
  ``multiprocessing.connection.Connection``; nothing is pickled, options travel as JSON).

Rebuilds run in the child: it reads the rows *itself* and builds the new index on a thread
while its main thread keeps answering queries from the old index (the backends release the
GIL while building; Annoy's ``add_item`` loop runs in a further process, ``_annoy_build.py``),
then swaps. Where the rows come from (the ``rows`` argument of ``maybe_rebuild`` /
``start_rebuild`` / ``rebuild``):

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
it, and so do garbage collection and interpreter exit (``weakref.finalize``). If the trainer dies, the child sees its pipe close (or its parent change)
within a second and exits: no orphan index process. A failed background rebuild in the child
is raised in the trainer at the next ``maybe_rebuild`` / ``wait_rebuild``, as in-process.

>>> sampler = build_sampler("faiss", N, 256, process=True, nprobe=1, interval=100)
>>> head = SampledHead(RemoteRowStore(client, "classifier"), sampler, sample_num=1000)
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any

from multiprocessing.connection import Connection

import numpy as np

from .base import ClassSampler

__all__ = ["ProcessSampler", "NpyRowSource", "IndexProcessError"]

logger = logging.getLogger(__name__)

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_REMOTE_INDEX = object()   # the trainer-side marker "the child has an index"
#: exception types re-raised as themselves in the trainer (others: IndexProcessError)
_ERROR_TYPES = {"ValueError": ValueError, "TypeError": TypeError, "ImportError": ImportError,
                "ModuleNotFoundError": ImportError, "FloatingPointError": FloatingPointError,
                "KeyError": KeyError, "IndexError": IndexError, "TimeoutError": TimeoutError}


class IndexProcessError(RuntimeError):
    """The index process reported an error (its message and traceback are included) or died."""


class NpyRowSource:
    """Rows in a ``.npy`` file that the index process loads (``delete``: then removes it).

    A FIFO path works too (the child reads it to the end before parsing), which the tests use
    to hold a rebuild open deterministically.
    """

    kind = "npy"

    def __init__(self, path: str | os.PathLike, delete: bool = False):
        self.path, self.delete = os.fspath(path), bool(delete)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "delete": self.delete}


# ----------------------------------------------------------------------------- wire format
def _send(conn, header: dict, payload=b"") -> None:
    """One message: a JSON header frame, then a raw payload frame (possibly empty)."""
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(payload)


def _recv(conn) -> tuple[dict, bytes]:
    header = json.loads(conn.recv_bytes().decode())
    return header, conn.recv_bytes()


def _error_reply(exc: BaseException) -> dict:
    return {"ok": False, "type": type(exc).__name__, "error": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc,
                                                            exc.__traceback__))[-4000:]}


def _source_dict(spec: Any) -> dict:
    """A row-source spec (object with ``to_dict`` or a dict) as a validated JSON-able dict."""
    d = spec.to_dict() if hasattr(spec, "to_dict") else spec
    if not isinstance(d, dict) or d.get("kind") not in ("paramserver", "npy"):
        raise ValueError(f"a row source must be a ParamRowSource, an NpyRowSource or their "
                         f"dict (kind 'paramserver' or 'npy'), got {spec!r}")
    json.dumps(d)  # must cross the pipe as JSON
    return d


# ----------------------------------------------------------------------------- the child
def _read_rows(source: dict) -> np.ndarray:
    """Runs in the index process, on its rebuild thread: all rows of ``source``."""
    if source["kind"] == "paramserver":
        from ..rowstore import ParamRowSource
        return ParamRowSource.from_dict(source).read()
    path = source["path"]
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            with open(path, "rb") as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
        return np.load(path, allow_pickle=False)
    finally:
        if source.get("delete"):
            try:
                os.unlink(path)
            except OSError:
                pass


def _status(backend) -> dict:
    with backend._lock:
        has_index, step = backend._index is not None, backend._index_step
    err, backend._rebuild_error = backend._rebuild_error, None
    return {"has_index": has_index, "index_step": step, "rebuilding": backend.rebuilding,
            "rebuilds": backend.rebuilds, "last_rebuild_s": backend.last_rebuild_s,
            "last_read_s": backend.last_read_s,
            "rebuild_error": None if err is None else f"{type(err).__name__}: {err}"}


def _child_main(fd: int, parent_pid: int) -> None:
    """The index process (``python -m hfsoftmax.samplers._index_child FD PARENT_PID``): read
    the init message, build the backend, then serve requests until told to stop, the pipe
    closes or the parent is gone."""
    from multiprocessing.connection import Connection
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    conn = Connection(fd)
    try:
        init, _ = _recv(conn)
        logging.basicConfig(level=int(init.get("log_level", logging.WARNING)),
                            format=f"%(asctime)s [index process {os.getpid()}] %(name)s "
                                   "%(levelname)s %(message)s")
        threads, name, dim = init.get("threads"), init["name"], int(init["dim"])
        if threads and name == "exact":
            import torch
            torch.set_num_threads(int(threads))
        from hfsoftmax.samplers.registry import build_sampler
        backend = build_sampler(name, int(init["num_classes"]), dim, **init["opts"])
    except BaseException as exc:
        try:
            _send(conn, _error_reply(exc))
        finally:
            conn.close()
        return
    _send(conn, {"ok": True, "pid": os.getpid(), **_status(backend)})
    try:
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:  # the trainer died: do not linger
                    break
                continue
            try:
                header, payload = _recv(conn)
            except (EOFError, OSError):  # the trainer closed its end (or died)
                break
            op = header.get("op")
            try:
                data = b""
                reply: dict = {"ok": True}
                if op == "query":
                    x = np.frombuffer(payload, dtype=np.float32).reshape(
                        int(header["batch"]), dim).copy()  # writable (torch warns otherwise)
                    if header.get("scores"):  # ids, then float32 scores, same shape
                        ids, scores = backend.query_scored(x, int(header["k"]))
                        ids = np.ascontiguousarray(ids, dtype=np.int64)
                        data = ids.tobytes() + np.ascontiguousarray(scores, np.float32).tobytes()
                    else:
                        ids = np.ascontiguousarray(backend.query(x, int(header["k"])),
                                                   dtype=np.int64)
                        data = ids.tobytes()
                    reply["shape"] = list(ids.shape)
                elif op == "rebuild":
                    source = header["source"]
                    reply["started"] = backend.start_rebuild(
                        lambda: _read_rows(source), int(header["step"]))
                elif op == "wait":
                    t = backend._thread
                    if t is not None:
                        t.join(max(0.0, float(header.get("timeout", 0.0))))
                elif op == "status":
                    pass
                elif op == "close":
                    _send(conn, reply)
                    break
                else:
                    raise ValueError(f"unknown index-process op {op!r}")
                reply.update(_status(backend))
                _send(conn, reply, data)
            except (EOFError, OSError):
                break
            except BaseException as exc:  # reported to the trainer, the child keeps serving
                _send(conn, {**_error_reply(exc), **_status(backend)})
    finally:
        conn.close()
        logging.shutdown()
        # A rebuild may still run on a daemon thread (e.g. a long build): do not wait for it.
        os._exit(0)


# ----------------------------------------------------------------------------- the parent
def _shutdown(proc, conn, lock, timeout: float = 10.0) -> None:
    """Stop the index process: ask it, then terminate, then kill. Idempotent."""
    if lock.acquire(timeout=timeout):
        try:
            if proc.poll() is None and not conn.closed:
                try:
                    _send(conn, {"op": "close"})
                    if conn.poll(timeout):
                        _recv(conn)
                except (EOFError, OSError):
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


class ProcessSampler(ClassSampler):
    """A backend sampler (``annoy``, ``hnsw``, ``faiss``, ``exact``) in an index process.

    ``backend``: the registered name; ``metric``, ``seed``, ``interval``, ``background``,
    ``neighbour_oversample``, ``mips`` as for every sampler; ``backend_opts`` go to the
    backend in the child (e.g. ``nprobe=1``). ``row_source``: rows to read when a rebuild
    is given ``rows=None`` (a ``ParamRowSource``, ``NpyRowSource`` or their dict).
    ``threads``: OpenMP / torch threads of the child (None: their defaults).
    ``start_timeout_s``: how long the child may take to start; ``timeout_s``: how long one
    request may take (a query; a rebuild request only starts the build). ``tmp_dir``: where
    rows staged from the trainer (arrays, local row stores) are written.
    """

    def __init__(self, backend: str, num_classes: int, dim: int, *, metric: str = "ip",
                 seed: int = 0, interval: int = 100, background: bool = True,
                 neighbour_oversample: float = 1.25, mips: str = "native",
                 random_share: float = 0.0, fresh_rows: int = 0, row_source: Any = None, threads: int | None = None,
                 start_timeout_s: float = 300.0, timeout_s: float = 600.0,
                 tmp_dir: str | None = None, **backend_opts):
        from .registry import list_samplers
        if backend not in list_samplers() or backend == "random":
            valid = ", ".join(n for n in list_samplers() if n != "random")
            raise ValueError(f"Unknown index backend {backend!r} for a process sampler. "
                             f"Valid: {valid} ('random' keeps no index: use it in-process)")
        super().__init__(num_classes, dim, metric=metric, seed=seed, interval=interval,
                         background=background, neighbour_oversample=neighbour_oversample,
                         mips=mips, random_share=random_share, fresh_rows=fresh_rows)
        self.backend = backend
        self.name = f"{backend}-process"
        self.row_source = None if row_source is None else _source_dict(row_source)
        self.timeout_s = float(timeout_s)
        self.tmp_dir = tmp_dir
        self._child_rebuilding = False
        self._closed = False
        opts = {"metric": metric, "seed": seed, "interval": interval, "background": True,
                "neighbour_oversample": neighbour_oversample, "mips": mips, **backend_opts}
        init = {"op": "init", "name": backend, "num_classes": self.num_classes,
                "dim": self.dim, "opts": opts, "threads": threads,
                "log_level": logging.getLogger().getEffectiveLevel()}
        try:
            init_bytes = json.dumps(init).encode()
        except TypeError as exc:
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
            self._conn.send_bytes(init_bytes)
            self._conn.send_bytes(b"")
            hello, _ = self._wait_reply(start_timeout_s, "start")
        except BaseException:
            self._finalizer()
            self._closed = True
            raise
        if not hello.get("ok"):
            self._finalizer()
            self._closed = True
            raise self._remote_error(hello, f"the {backend} index process failed to start")
        self.pid: int = int(hello["pid"])
        logger.info("%s: index process %d started (%d classes x %d)", self.name, self.pid,
                    self.num_classes, self.dim)

    # ------------------------------------------------------------------ transport
    def _wait_reply(self, timeout: float, what: str) -> tuple[dict, bytes]:
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
            return _recv(self._conn)
        except (EOFError, OSError) as exc:
            raise IndexProcessError(f"{self.name}: lost the index process during {what} "
                                    f"({exc!r})") from None

    def _remote_error(self, reply: dict, context: str) -> BaseException:
        typ = _ERROR_TYPES.get(reply.get("type"), IndexProcessError)
        msg = f"{context}: {reply.get('type')}: {reply.get('error')}"
        exc = typ(msg)
        exc.remote_traceback = reply.get("traceback")  # type: ignore[attr-defined]
        return exc

    def _call(self, header: dict, payload=b"", timeout: float | None = None):
        """Send one request and return ``(reply, data)``; raises the child's error."""
        with self._rpc_lock:
            if self._closed or self._conn.closed:
                raise RuntimeError(f"{self.name} is closed")
            try:
                _send(self._conn, header, payload)
            except (OSError, EOFError) as exc:
                raise IndexProcessError(f"{self.name}: cannot reach the index process "
                                        f"(exit code {self._proc.poll()}): {exc!r}") from None
            try:
                reply, data = self._wait_reply(self.timeout_s if timeout is None else timeout,
                                               header["op"])
            except TimeoutError:
                # the pipe is out of step now: this sampler cannot be used any more
                self._closed = True
                self._conn.close()
                raise
        self._apply_status(reply)
        if not reply.get("ok"):
            raise self._remote_error(reply, f"{self.name}: {header['op']} failed in the "
                                            "index process")
        return reply, data

    def _apply_status(self, reply: dict) -> None:
        if "has_index" not in reply:
            return
        self._index = _REMOTE_INDEX if reply["has_index"] else None
        self._index_step = reply["index_step"]
        self._child_rebuilding = bool(reply["rebuilding"])
        self.rebuilds = int(reply["rebuilds"])
        self.last_rebuild_s, self.last_read_s = reply["last_rebuild_s"], reply["last_read_s"]
        if reply.get("rebuild_error"):
            self._rebuild_error = IndexProcessError(
                f"{self.name}: rebuild in the index process failed: {reply['rebuild_error']}")

    def refresh(self) -> dict:
        """Ask the index process for its status (index step, rebuilding, timings)."""
        reply, _ = self._call({"op": "status"})
        return reply

    # ------------------------------------------------------------------ queries
    def prepare_queries(self, features: np.ndarray) -> np.ndarray:
        """Identity: the index process prepares (normalises) the queries itself."""
        return features

    def _search(self, index, queries: np.ndarray, k: int) -> np.ndarray:
        x = np.ascontiguousarray(queries, dtype=np.float32)
        reply, data = self._call({"op": "query", "batch": int(x.shape[0]), "k": int(k)},
                                 x.data.cast("B") if x.size else b"")
        return np.frombuffer(data, dtype=np.int64).reshape(reply["shape"]).copy()

    def _search_scored(self, index, queries: np.ndarray, k: int):
        x = np.ascontiguousarray(queries, dtype=np.float32)
        reply, data = self._call({"op": "query", "batch": int(x.shape[0]), "k": int(k),
                                  "scores": True}, x.data.cast("B") if x.size else b"")
        shape = tuple(reply["shape"])
        n = int(np.prod(shape)) * 8
        ids = np.frombuffer(data[:n], dtype=np.int64).reshape(shape).copy()
        scores = np.frombuffer(data[n:], dtype=np.float32).reshape(shape).copy()
        return ids, scores

    def query(self, features, k: int) -> np.ndarray:
        if self._index is None and not self._closed:
            self.refresh()
        return super().query(features, k)

    def select(self, features, labels, sample_num: int, log_weights: bool | str = False):
        if self._index is None and not self._closed:
            self.refresh()  # has the first index been built meanwhile?
        return super().select(features, labels, sample_num, log_weights)

    # ------------------------------------------------------------------ rebuilds
    @property
    def rebuilding(self) -> bool:
        """Whether a rebuild is being staged here or runs in the index process."""
        t = self._thread
        if t is not None and t.is_alive():
            return True
        if self._closed:
            return False
        return bool(self.refresh()["rebuilding"])

    def _source_for(self, rows) -> dict | None:
        """The spec the child reads by itself, or None when the rows go through a file."""
        if rows is None:
            if self.row_source is None:
                raise ValueError(f"{self.name}: rebuild got rows=None and the sampler has no "
                                 "row_source; pass rows, a reader or a ParamRowSource")
            return self.row_source
        if isinstance(rows, dict) or hasattr(rows, "to_dict"):
            return _source_dict(rows)
        spec = getattr(rows, "row_source", None)  # RemoteRowStore.reader()
        return None if spec is None else _source_dict(spec)

    def _stage(self, rows) -> dict:
        """Trainer side of an array/callable source: write the rows to a temporary .npy."""
        raw = rows() if callable(rows) else rows
        raw = np.asarray(raw)
        if raw.shape != (self.num_classes, self.dim):
            raise ValueError(f"rows must have shape (num_classes, dim) = ({self.num_classes}, "
                             f"{self.dim}), got {tuple(raw.shape)}")
        fd, path = tempfile.mkstemp(prefix="hfsoftmax-rows-", suffix=".npy", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(raw, dtype=np.float32), allow_pickle=False)
        except BaseException:
            os.unlink(path)
            raise
        return NpyRowSource(path, delete=True).to_dict()

    def start_rebuild(self, rows, step: int | None = None) -> bool:
        """Start a rebuild in the index process; False if one is already running.

        ``rows``: see the module docstring (a row-source spec or a reader carrying one is
        read by the child itself; an array or callable is staged through a temporary file on
        a trainer thread).
        """
        self._raise_rebuild_error()
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        if self.rebuilding:
            logger.debug("%s: rebuild still running, not starting another", self.name)
            return False
        step = self.current_step if step is None else int(step)
        spec = self._source_for(rows)
        self._last_start_step = step
        if spec is not None:
            reply, _ = self._call({"op": "rebuild", "source": spec, "step": step})
            return bool(reply["started"])

        def stage_and_send():
            try:
                self._call({"op": "rebuild", "source": self._stage(rows), "step": step})
            except BaseException as exc:  # surfaced on the training thread
                logger.exception("%s: staging the rows for a rebuild failed", self.name)
                self._rebuild_error = exc

        self._thread = threading.Thread(target=stage_and_send, daemon=True,
                                        name=f"{self.name}-stage-rows")
        self._thread.start()
        return True

    def wait_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a running rebuild; True if none is running any more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        t = self._thread
        if t is not None:
            t.join(timeout)
        while not self._closed:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                self.refresh()
                break
            reply, _ = self._call({"op": "wait", "timeout": left})
            if not reply["rebuilding"]:
                break
        self._raise_rebuild_error()
        return not self.rebuilding

    def rebuild(self, rows, step: int | None = None) -> float:
        """Synchronously (re)build the index in the index process; returns its seconds."""
        self.wait_rebuild()
        self.start_rebuild(rows, step)
        self.wait_rebuild()
        return float(self.last_rebuild_s or 0.0)

    # ------------------------------------------------------------------ lifecycle, telemetry
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
        """The in-process samplers' figures plus the index process's pid and RSS."""
        out = super().stats()
        out.update({"index_pid": self._proc.pid, "index_rss_mb": self.index_rss_mb()})
        return out

    def close(self, timeout: float | None = None):
        """Stop the index process (it is not waited for to finish a running build)."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        self._closed = True
        self._finalizer()
        self._index = None
        self._index_step = None

    def __repr__(self):
        return (f"ProcessSampler(backend={self.backend!r}, num_classes={self.num_classes}, "
                f"dim={self.dim}, metric={self.metric!r}, interval={self.interval}, "
                f"pid={self._proc.pid})")
