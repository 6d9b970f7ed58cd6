"""The index process: one index backend served over a pipe to the trainer.

Started by :class:`~hfsoftmax.samplers.process.ProcessIndexHandle` as a fresh interpreter,
``python -m hfsoftmax.samplers._index_child FD PARENT_PID`` (FD: its end of a socketpair).
It keeps an in-process :class:`~hfsoftmax.samplers.handle.IndexHandle`, so a rebuild reads
the rows and builds on a thread while the main thread keeps answering queries from the old
index, then swaps: exactly what an in-process sampler does.

Messages (:mod:`~hfsoftmax.samplers.pipe`: ``paramserver/wire.py``'s JSON header + raw
array frames). The first is ``init`` (backend name, table size, backend options); then

* ``query`` (``k``, ``scores``; the (B, D) float32 features as a frame): the (B, k) int64
  ids, and with ``scores`` the (B, k) float32 scores, as frames;
* ``rebuild`` (``source``: a row-source dict, ``step``): starts a rebuild, replies
  ``started``;
* ``wait`` (``timeout``): waits that long at most for a running rebuild;
* ``status``: nothing more; ``close``: replies, then exits.

Every reply carries ``ok``, the handle's ``status``
(:class:`~hfsoftmax.samplers.handle.IndexStatus` as a dict) and ``rebuild_error`` (the
message of a background rebuild that failed since the last reply, else None); an error reply
adds ``type``, ``error`` and ``traceback`` and the process keeps serving.

Torch-free unless the backend needs it (exact). Exits when the trainer closes its end, asks
it to, or dies (the parent pid changes; checked every second); ignores SIGINT (Ctrl-C is the
trainer's to handle).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import numpy as np

from hfsoftmax.samplers.handle import IndexHandle
from hfsoftmax.samplers.pipe import error_reply, recv, send
from hfsoftmax.samplers.registry import build_index
from hfsoftmax.samplers.rowsource import read_rows


def _state(handle: IndexHandle) -> dict:
    """What every reply carries: the status, and a failed rebuild's message (once)."""
    err = handle.take_error()
    return {"status": handle.status().to_dict(),
            "rebuild_error": None if err is None else f"{type(err).__name__}: {err}"}


def _answer(handle: IndexHandle, header: dict, arrays: list) -> tuple[dict, list]:
    """One request's reply header (before the state) and array frames."""
    op = header.get("op")
    if op == "query":
        if len(arrays) != 1:
            raise ValueError(f"a query carries one features frame, got {len(arrays)}")
        x = np.array(arrays[0], dtype=np.float32)  # writable (torch warns otherwise)
        if header.get("scores"):
            ids, scores = handle.search(x, int(header["k"]), scored=True)
            return {"ok": True}, [np.ascontiguousarray(ids, dtype=np.int64),
                                  np.ascontiguousarray(scores, dtype=np.float32)]
        ids = handle.search(x, int(header["k"]))
        return {"ok": True}, [np.ascontiguousarray(ids, dtype=np.int64)]
    if op == "rebuild":
        source = header["source"]
        started = handle.start_rebuild(lambda: read_rows(source), int(header["step"]))
        return {"ok": True, "started": started}, []
    if op == "wait":
        handle.join(max(0.0, float(header.get("timeout", 0.0))))
        return {"ok": True}, []
    if op in ("status", "close"):
        return {"ok": True}, []
    raise ValueError(f"unknown index-process op {op!r}")


def serve(conn, parent_pid: int) -> None:
    """Read the init message, make the backend, then answer requests until told to stop,
    the pipe closes or the parent is gone."""
    try:
        init, _ = recv(conn)
        logging.basicConfig(level=int(init.get("log_level", logging.WARNING)),
                            format=f"%(asctime)s [index process {os.getpid()}] %(name)s "
                                   "%(levelname)s %(message)s")
        backend = build_index(init["name"], int(init["num_classes"]), int(init["dim"]),
                              **init["opts"])
        if init.get("threads"):
            backend.limit_threads(int(init["threads"]))
        handle = IndexHandle(backend)
    except BaseException as exc:
        send(conn, error_reply(exc))
        return
    send(conn, {"ok": True, "pid": os.getpid(), "mips": handle.mips, **_state(handle)})
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent_pid:  # the trainer died: do not linger
                return
            continue
        try:
            header, arrays = recv(conn)
        except (EOFError, OSError):  # the trainer closed its end (or died)
            return
        except Exception as exc:  # a malformed message: say so, keep serving
            send(conn, {**error_reply(exc), **_state(handle)})
            continue
        try:
            reply, out = _answer(handle, header, arrays)
        except BaseException as exc:  # reported to the trainer, the process keeps serving
            reply, out = error_reply(exc), []
        try:
            send(conn, {**reply, **_state(handle)}, out)
        except (EOFError, OSError):  # the trainer is gone
            return
        if header.get("op") == "close":
            return


def main(argv: list[str]) -> None:
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    conn = Connection(int(argv[0]))
    try:
        serve(conn, int(argv[1]))
    except (EOFError, OSError):
        pass
    finally:
        conn.close()
        logging.shutdown()
        # A rebuild may still run on a daemon thread (e.g. a long build): do not wait for it.
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
