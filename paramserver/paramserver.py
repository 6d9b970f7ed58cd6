"""The parameter server: tables of float32 rows, synchronous SGD over workers, snapshots.

Start it with ``python paramserver/paramserver.py`` (or the console entry
``hfsoftmax-paramserver``); ``--help`` lists every flag. One process serves one shard; a
client spreads rows over several processes. The wire protocol is in ``PROTOCOL.md``.

Design in one paragraph: a single ZeroMQ ROUTER socket and a single-threaded loop, so no
locks and every request is handled in arrival order. Requests are answered at once, except
``push``: its reply is sent when the synchronous step it belongs to has been applied (all
live workers pushed, or the missing ones were dropped after ``--worker-timeout``). A
ROUTER socket keeps serving the other clients meanwhile. Every request is validated in full
before anything changes; a bad one gets ``{"ok": false, "error": ...}`` and changes nothing.

>>> # python paramserver/paramserver.py --bind tcp://127.0.0.1:5570 --workers 2
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__" and not __package__:
    # Run as a script: make the package importable and stop this folder from shadowing it.
    _here = str(Path(__file__).resolve().parent)
    sys.path = [p for p in sys.path if p and Path(p).resolve() != Path(_here)]
    sys.path.insert(0, str(Path(_here).parent))

import numpy as np
import zmq

from paramserver.optim import NonFiniteUpdateError, SGDConfig
from paramserver.snapshot import (SnapshotError, read_snapshot, remove_stale_temp_files,
                                  write_snapshot)
from paramserver.table import INITS, Table
from paramserver.wire import PROTOCOL_VERSION, ProtocolError, decode_arrays, decode_header, encode

__all__ = ["ParamServer", "RequestError", "is_loopback", "main", "build_parser"]

log = logging.getLogger("paramserver")

DEFAULT_BIND = "tcp://127.0.0.1:5570"
TABLE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
MAX_DIM = 1 << 16
MAX_INT = (1 << 63) - 1
_DEFERRED = object()  # a handler's answer meaning "the reply is sent later"


class RequestError(ValueError):
    """A request the server refuses; its message goes back to the client verbatim."""


def is_loopback(address: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and ``tcp://`` on 127.0.0.0/8, ::1 or localhost."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    m = re.fullmatch(r"tcp://(.+):(\d+|\*)", address)
    if not m:
        return False
    host = m.group(1).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: assume exposed
        return False


@dataclass
class _Round:
    """The pending synchronous step of one table."""

    step: int
    started: float
    pushes: dict = field(default_factory=dict)    # worker -> (local rows, grads)
    waiters: list = field(default_factory=list)   # (envelope, request id, worker)


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class _Header:
    """Typed access to a request header with errors that name the field and the fix."""

    def __init__(self, header: dict, allowed: set[str]):
        extra = set(header) - allowed - {"op", "id", "arrays"}
        if extra:
            raise RequestError(f"op {header.get('op')!r}: unknown header field(s) "
                               f"{sorted(extra)}; valid: {sorted(allowed)}")
        self.h = header

    def get(self, name: str, kind: str, default: Any = ..., lo: float | None = None,
            hi: float | None = None) -> Any:
        if name not in self.h:
            if default is ...:
                raise RequestError(f"op {self.h.get('op')!r}: missing header field {name!r}")
            return default
        v = self.h[name]
        if kind == "int":
            ok = type(v) is int
        elif kind == "float":
            ok = type(v) in (int, float) and math.isfinite(v)
            v = float(v) if ok else v
        elif kind == "bool":
            ok = type(v) is bool
        elif kind == "str":
            ok = isinstance(v, str) and len(v) <= 4096
        else:  # pragma: no cover - programming error
            raise TypeError(kind)
        if not ok:
            raise RequestError(f"op {self.h.get('op')!r}: field {name!r} must be {kind}, "
                               f"got {_short(v)}")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise RequestError(f"op {self.h.get('op')!r}: field {name!r}={v!r} outside "
                               f"[{lo}, {hi}]")
        return v


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ParamServer:
    """One server process (or shard). Not thread-safe: run :meth:`serve_forever` in one
    thread; :meth:`stop` may be called from a signal handler."""

    def __init__(self, bind: str = DEFAULT_BIND, *, workers: int = 1,
                 worker_timeout: float = 60.0, max_message_bytes: int = 1 << 30,
                 snapshot_dir: str | None = None, restore: str | None = None,
                 curve_secret_key: str | None = None, curve_public_keys_dir: str | None = None,
                 insecure: bool = False, ready_file: str | None = None,
                 stats_interval: float = 60.0):
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        if not worker_timeout > 0:
            raise ValueError(f"--worker-timeout must be > 0 seconds, got {worker_timeout}")
        self.workers_flag = workers
        self.live: set[int] = set(range(workers))
        self.worker_timeout = float(worker_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.snapshot_dir = Path(snapshot_dir).resolve() if snapshot_dir else None
        self.tables: dict[str, Table] = {}
        self.rounds: dict[str, _Round] = {}
        self.stats: dict[str, int] = {}
        self.errors = 0
        self.stats_interval = stats_interval
        self._stop = False
        self._auth = None
        # Temp files of snapshot writes that a kill -9 interrupted (this process writes none
        # yet, so even a file with its own pid is a leftover); each removal is logged.
        folders = [self.snapshot_dir] if self.snapshot_dir else []
        if restore:
            folders.append(self._resolve(restore).parent)
        for folder in dict.fromkeys(folders):
            remove_stale_temp_files(folder, own_pid_is_stale=True)
        if restore:
            self.tables, _ = read_snapshot(self._resolve(restore))
            log.info("restored %d table(s) from %s: %s", len(self.tables), restore,
                     {n: t.updates for n, t in self.tables.items()})

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if curve_secret_key:
            self._setup_curve(curve_secret_key, curve_public_keys_dir)
        elif not is_loopback(bind):
            if not insecure:
                self.close()
                raise ValueError(
                    f"refusing to bind {bind} without authentication: anyone who can reach "
                    "it could rewrite the model. Use --curve-secret-key and "
                    "--curve-public-keys-dir (make keys with `python -m paramserver.keys`), "
                    "or pass --insecure on a trusted network")
            log.warning("binding %s with NO authentication (--insecure): anyone who can "
                        "reach this address can read and overwrite every table", bind)
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("serving on %s (workers %s, worker timeout %.1f s, curve %s)", self.address,
                 sorted(self.live), self.worker_timeout, "on" if curve_secret_key else "off")
        if ready_file:
            tmp = f"{ready_file}.tmp"
            with open(tmp, "w") as f:
                f.write(self.address + "\n")
            os.replace(tmp, ready_file)

        self.handlers: dict[str, Callable] = {
            "ping": self.op_ping, "register": self.op_register,
            "create_table": self.op_create_table, "set_optimizer": self.op_set_optimizer,
            "set_lr": self.op_set_lr, "pull": self.op_pull, "push": self.op_push,
            "set_rows": self.op_set_rows, "read": self.op_read, "table_info": self.op_table_info,
            "snapshot": self.op_snapshot, "restore": self.op_restore,
        }

    # ----------------------------------------------------------------- setup / teardown
    def _setup_curve(self, secret_key_file: str, public_keys_dir: str | None) -> None:
        from zmq import auth as zmq_auth
        from zmq.auth.thread import ThreadAuthenticator

        if not public_keys_dir or not Path(public_keys_dir).is_dir():
            self.close()
            raise ValueError("--curve-secret-key needs --curve-public-keys-dir, a folder of "
                             "the allowed clients' public *.key files; got "
                             f"{public_keys_dir!r}")
        public, secret = zmq_auth.load_certificate(secret_key_file)
        if secret is None:
            self.close()
            raise ValueError(f"{secret_key_file} holds no secret key; pass the server's "
                             "*.key_secret file made by `python -m paramserver.keys`")
        self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("paramserver.auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(public_keys_dir))
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True
        n = len(list(Path(public_keys_dir).glob("*.key")))
        log.info("CURVE authentication on: %d allowed client key(s) in %s", n, public_keys_dir)

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stop = True

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.sock.close(linger=0)
        self.ctx.term()

    # ----------------------------------------------------------------------- main loop
    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; pending pushes then get an error reply."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        last_stats = time.monotonic()
        try:
            while not self._stop:
                timeout_ms = 100
                if self.rounds:
                    first = min(r.started for r in self.rounds.values()) + self.worker_timeout
                    timeout_ms = max(0, min(timeout_ms, int((first - time.monotonic()) * 1000)
                                            + 1))
                if poller.poll(timeout_ms):
                    for _ in range(1000):  # drain, but keep checking timeouts and signals
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames)
                self._expire_workers()
                now = time.monotonic()
                if self.stats_interval > 0 and now - last_stats >= self.stats_interval:
                    log.info("requests %s, errors %d, steps %s", dict(sorted(self.stats.items())),
                             self.errors, {n: t.updates for n, t in self.tables.items()})
                    last_stats = now
        finally:
            for name, rnd in list(self.rounds.items()):
                for env, rid, _w in rnd.waiters:
                    self._send(env, {"ok": False, "id": rid, "error": "server stopping; "
                                     f"step {rnd.step} of table {name!r} was not applied"})
            self.rounds.clear()
            log.info("stopped")
            self.close()

    def _send(self, envelope: list, header: dict, arrays: tuple = ()) -> None:
        try:
            self.sock.send_multipart(envelope + encode(header, arrays), copy=False)
        except zmq.ZMQError as exc:  # peer gone or queue full: never crash the server
            log.warning("could not send a reply: %s", exc)

    def handle(self, frames: list) -> None:
        """Handle one request ``[identity, b"", header, arrays...]`` and reply (maybe later)."""
        envelope = [frames[0], b""]
        rid = None
        op = None
        try:
            if len(frames) < 3 or len(frames[1]) != 0:
                raise ProtocolError(
                    f"message must be [empty delimiter frame, JSON header frame, array frames"
                    f"...]; got {len(frames) - 1} frame(s)"
                    + ("" if len(frames) < 2 or len(frames[1]) == 0
                       else " with a non-empty first frame"))
            header = decode_header(frames[2])
            rid = header.get("id")
            if rid is not None and not (type(rid) is int or isinstance(rid, str) and
                                        len(rid) <= 128):
                rid = None
                raise ProtocolError("header 'id' must be an integer or a short string")
            op = header.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RequestError(f"unknown op {_short(op)}; valid: "
                                   f"{', '.join(sorted(self.handlers))}")
            arrays = decode_arrays(header, frames[3:])
            self.stats[op] = self.stats.get(op, 0) + 1
            result = handler(header, arrays, (envelope, rid))
            if result is _DEFERRED:
                return
            reply, out = result
            self._send(envelope, {"ok": True, "id": rid, **reply}, out)
        except (ProtocolError, RequestError, SnapshotError, ValueError, IndexError) as exc:
            self.errors += 1
            log.info("refused %s: %s", op if isinstance(op, str) else "request", exc)
            self._send(envelope, {"ok": False, "id": rid, "error": str(exc)})
        except MemoryError:
            self.errors += 1
            log.error("out of memory handling %s", op)
            self._send(envelope, {"ok": False, "id": rid, "error": f"server out of memory "
                                  f"handling {op!r}"})
        except Exception as exc:  # a bug: keep serving, tell the client, log the traceback
            self.errors += 1
            log.exception("internal error handling %s", op)
            self._send(envelope, {"ok": False, "id": rid,
                                  "error": f"internal server error: {type(exc).__name__}: "
                                           f"{exc}"})

    # --------------------------------------------------------------------------- helpers
    def _table(self, h: _Header) -> Table:
        name = h.get("table", "str")
        t = self.tables.get(name)
        if t is None:
            raise RequestError(f"no table {_short(name)}; tables: {sorted(self.tables)} "
                               "(create it with create_table)")
        return t

    @staticmethod
    def _expect(arrays: list, specs: list[tuple[str, str, int]], op: str) -> None:
        """Check the array frames' count, dtypes and ranks: specs = (name, dtype, ndim)."""
        if len(arrays) != len(specs):
            raise RequestError(f"op {op!r} takes {len(specs)} array frame(s) "
                               f"({', '.join(s[0] for s in specs) or 'none'}), got "
                               f"{len(arrays)}")
        for a, (name, dtype, ndim) in zip(arrays, specs):
            if a.dtype != np.dtype(dtype).newbyteorder("<") or a.ndim != ndim:
                raise RequestError(f"op {op!r}: {name} must be {ndim}-D {dtype}, got "
                                   f"{a.ndim}-D {a.dtype.name}")

    def _local_rows(self, t: Table, rows: np.ndarray) -> np.ndarray:
        local = rows - t.row_start
        t.check_rows(local)
        return local

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        if self.snapshot_dir is None:
            return p
        full = (self.snapshot_dir / p).resolve()
        if full != self.snapshot_dir and self.snapshot_dir not in full.parents:
            raise RequestError(f"snapshot path {path!r} is outside --snapshot-dir "
                               f"{str(self.snapshot_dir)!r}")
        return full

    def _info(self, t: Table) -> dict:
        rnd = self.rounds.get(t.name)
        return {"table": t.name, "global_rows": t.global_rows, "row_start": t.row_start,
                "row_stop": t.row_start + t.num_rows, "num_rows": t.num_rows, "dim": t.dim,
                "init": t.init, "std": t.std, "seed": t.seed, "optimizer": t.optim.to_dict(),
                "step": t.updates,
                "pending": None if rnd is None else {"step": rnd.step,
                                                     "workers": sorted(rnd.pushes)}}

    # ------------------------------------------------------------------------------ ops
    def op_ping(self, header, arrays, ctx):
        _Header(header, set())
        self._expect(arrays, [], "ping")
        return {"server": "hfsoftmax-paramserver", "protocol": PROTOCOL_VERSION,
                "workers": sorted(self.live), "worker_timeout_s": self.worker_timeout,
                "max_message_bytes": self.max_message_bytes,
                "tables": {n: t.updates for n, t in self.tables.items()}}, ()

    def op_register(self, header, arrays, ctx):
        h = _Header(header, {"worker"})
        self._expect(arrays, [], "register")
        w = h.get("worker", "int", lo=0, hi=(1 << 31) - 1)
        if w not in self.live:
            self.live.add(w)
            log.info("worker %d registered; live workers %s", w, sorted(self.live))
        return {"workers": sorted(self.live)}, ()

    def op_create_table(self, header, arrays, ctx):
        h = _Header(header, {"table", "num_rows", "dim", "init", "std", "seed", "row_start",
                             "row_stop"})
        self._expect(arrays, [], "create_table")
        name = h.get("table", "str")
        if not TABLE_NAME.match(name):
            raise RequestError(f"table name {_short(name)} must match {TABLE_NAME.pattern}")
        num_rows = h.get("num_rows", "int", lo=1, hi=MAX_INT)
        dim = h.get("dim", "int", lo=1, hi=MAX_DIM)
        init = h.get("init", "str", "normal")
        if init not in INITS:
            raise RequestError(f"unknown init {_short(init)}; valid: {', '.join(INITS)}")
        std = h.get("std", "float", 0.01, lo=0.0, hi=1e6)
        seed = h.get("seed", "int", 0, lo=0, hi=(1 << 63) - 1)
        row_start = h.get("row_start", "int", 0, lo=0, hi=num_rows)
        row_stop = h.get("row_stop", "int", num_rows, lo=row_start, hi=num_rows)
        spec = {"global_rows": num_rows, "dim": dim, "init": init, "std": std, "seed": seed,
                "row_start": row_start, "row_stop": row_stop}
        old = self.tables.get(name)
        if old is not None:
            have = {"global_rows": old.global_rows, "dim": old.dim, "init": old.init,
                    "std": old.std, "seed": old.seed, "row_start": old.row_start,
                    "row_stop": old.row_start + old.num_rows}
            diff = {k: (have[k], spec[k]) for k in spec if have[k] != spec[k]}
            if diff:
                raise RequestError(f"table {name!r} exists with different settings "
                                   f"(existing, requested): {diff}")
            return {"created": False, "info": self._info(old)}, ()
        nbytes = 8 * (row_stop - row_start) * dim  # weights + momentum
        mem = _total_memory()
        if mem is not None and nbytes > mem:
            raise RequestError(f"table {name!r} needs {nbytes / 2**30:.1f} GiB (weights + "
                               f"momentum) but this machine has {mem / 2**30:.1f} GiB; "
                               "shard it over more servers")
        t = Table(name, row_stop - row_start, dim, init=init, std=std, seed=seed,
                  row_start=row_start, global_rows=num_rows)
        self.tables[name] = t
        log.info("created table %r: rows [%d, %d) of %d, dim %d, init %s std %g seed %d",
                 name, row_start, row_stop, num_rows, dim, init, std, seed)
        return {"created": True, "info": self._info(t)}, ()

    def op_set_optimizer(self, header, arrays, ctx):
        h = _Header(header, {"table", "lr", "momentum", "weight_decay", "nesterov", "renorm",
                             "max_norm", "catchup_decay"})
        self._expect(arrays, [], "set_optimizer")
        t = self._table(h)
        cfg = SGDConfig(lr=h.get("lr", "float"), momentum=h.get("momentum", "float", 0.0),
                        weight_decay=h.get("weight_decay", "float", 0.0),
                        nesterov=h.get("nesterov", "bool", False),
                        renorm=h.get("renorm", "float", 0.0),
                        max_norm=h.get("max_norm", "float", 0.0),
                        catchup_decay=h.get("catchup_decay", "bool", False))
        t.optim = cfg
        log.info("table %r optimizer: %s", t.name, cfg.to_dict())
        return {"optimizer": cfg.to_dict()}, ()

    def op_set_lr(self, header, arrays, ctx):
        h = _Header(header, {"table", "lr"})
        self._expect(arrays, [], "set_lr")
        t = self._table(h)
        cfg = SGDConfig(**{**t.optim.to_dict(), "lr": h.get("lr", "float")})
        if cfg.lr != t.optim.lr:
            log.info("table %r lr %g -> %g at step %d", t.name, t.optim.lr, cfg.lr, t.updates)
        t.optim = cfg
        return {"optimizer": cfg.to_dict()}, ()

    def op_pull(self, header, arrays, ctx):
        h = _Header(header, {"table"})
        t = self._table(h)
        self._expect(arrays, [("rows", "int64", 1)], "pull")
        rows = arrays[0]
        if rows.shape[0] * t.dim * 4 > self.max_message_bytes:
            raise RequestError(f"pull of {rows.shape[0]} rows of {t.dim} exceeds the reply "
                               f"limit of {self.max_message_bytes} bytes; pull fewer rows")
        return {"step": t.updates}, (t.pull(self._local_rows(t, rows)),)

    def op_set_rows(self, header, arrays, ctx):
        h = _Header(header, {"table"})
        t = self._table(h)
        self._expect(arrays, [("rows", "int64", 1), ("values", "float32", 2)], "set_rows")
        rows, values = arrays
        t.set_rows(rows - t.row_start, values)
        return {"rows": int(rows.shape[0])}, ()

    def op_read(self, header, arrays, ctx):
        h = _Header(header, {"table", "start", "stop", "field"})
        t = self._table(h)
        self._expect(arrays, [], "read")
        stop_max = t.row_start + t.num_rows
        start = h.get("start", "int", t.row_start, lo=t.row_start, hi=stop_max)
        stop = h.get("stop", "int", stop_max, lo=start, hi=stop_max)
        fld = h.get("field", "str", "weight")
        if fld not in ("weight", "momentum"):
            raise RequestError(f"read field {_short(fld)} unknown; valid: weight, momentum")
        if (stop - start) * t.dim * 4 > self.max_message_bytes:
            raise RequestError(f"read of rows [{start}, {stop}) exceeds the reply limit of "
                               f"{self.max_message_bytes} bytes; read in smaller chunks")
        lo, hi = start - t.row_start, stop - t.row_start
        # copies (zmq sends later); the weights as Table.read gives them (owed decay applied)
        values = t.read(lo, hi) if fld == "weight" else t.momentum[lo:hi].copy()
        return {"start": start, "stop": stop, "step": t.updates}, (values,)

    def op_table_info(self, header, arrays, ctx):
        h = _Header(header, {"table", "checksum"})
        t = self._table(h)
        self._expect(arrays, [], "table_info")
        info = self._info(t)
        if h.get("checksum", "bool", False):
            info["checksum"] = t.checksum()
        return info, ()

    def op_snapshot(self, header, arrays, ctx):
        h = _Header(header, {"path", "shard_index", "shard_count"})
        self._expect(arrays, [], "snapshot")
        path = self._resolve(h.get("path", "str"))
        count = h.get("shard_count", "int", 1, lo=1, hi=1 << 20)
        index = h.get("shard_index", "int", 0, lo=0, hi=count - 1)
        t0 = time.monotonic()
        try:
            size = write_snapshot(path, self.tables, {"shard_index": index,
                                                      "shard_count": count})
        except OSError as exc:
            raise RequestError(f"snapshot to {str(path)!r} failed: {exc}") from None
        steps = {n: t.updates for n, t in self.tables.items()}
        log.info("snapshot %s: %d table(s) %s, %.1f MB in %.2f s", path, len(self.tables),
                 steps, size / 1e6, time.monotonic() - t0)
        return {"path": str(path), "bytes": size, "tables": steps}, ()

    def op_restore(self, header, arrays, ctx):
        h = _Header(header, {"path", "shard_index", "shard_count", "check"})
        self._expect(arrays, [], "restore")
        path = self._resolve(h.get("path", "str"))
        count = h.get("shard_count", "int", None, lo=1, hi=1 << 20)
        index = h.get("shard_index", "int", None, lo=0, hi=(count or 1) - 1)
        check = h.get("check", "bool", False)
        if self.rounds:
            raise RequestError(f"cannot restore while steps are pending: "
                               f"{ {n: r.step for n, r in self.rounds.items()} }; restore "
                               "before the workers push")
        try:
            tables, meta = read_snapshot(path)
        except OSError as exc:
            raise RequestError(f"restore from {str(path)!r} failed: {exc}") from None
        have = (int(meta.get("shard_index", 0)), int(meta.get("shard_count", 1)))
        want = (index if index is not None else have[0], count if count is not None else have[1])
        if have != want:
            raise RequestError(f"{str(path)!r} is shard {have[0]} of {have[1]}, not "
                               f"{want[0]} of {want[1]}; nothing was restored")
        steps = {n: t.updates for n, t in tables.items()}
        if check:  # the first phase of a sharded restore: the file would do; nothing changes
            log.info("checked %s for a restore: %d table(s), steps %s", path, len(tables), steps)
        else:
            self.tables = tables
            log.info("restored %d table(s) from %s: steps %s", len(tables), path, steps)
        return {"path": str(path), "tables": steps, "check": check,
                "shard_index": int(meta.get("shard_index", 0)),
                "shard_count": int(meta.get("shard_count", 1))}, ()

    # ------------------------------------------------------------------ synchronous SGD
    def op_push(self, header, arrays, ctx):
        h = _Header(header, {"table", "worker", "step"})
        t = self._table(h)
        self._expect(arrays, [("rows", "int64", 1), ("grads", "float32", 2)], "push")
        worker = h.get("worker", "int", lo=0, hi=(1 << 31) - 1)
        step = h.get("step", "int", lo=1, hi=MAX_INT)
        rows, grads = arrays
        local = self._local_rows(t, rows)
        t.check_grads(local, grads)  # finite, and repeated rows sum to finite values
        if step <= t.updates:
            raise RequestError(f"push of step {step} to table {t.name!r} is stale: the table "
                               f"is at step {t.updates} (a worker dropped after "
                               "--worker-timeout, or --workers lower than the number of "
                               f"workers?); its next step is {t.updates + 1}")
        if step > t.updates + 1:
            raise RequestError(f"push of step {step} to table {t.name!r} is ahead: the table "
                               f"is at step {t.updates}, its next step is {t.updates + 1}")
        rnd = self.rounds.get(t.name)
        if rnd is not None and worker in rnd.pushes:
            raise RequestError(f"worker {worker} already pushed step {step} of table "
                               f"{t.name!r}; each worker pushes once per step")
        # Everything is valid: from here on the push is accepted.
        if worker not in self.live:
            self.live.add(worker)
            log.info("worker %d joined at step %d of table %r; live workers %s", worker,
                     step, t.name, sorted(self.live))
        if rnd is None:
            rnd = self.rounds[t.name] = _Round(step, time.monotonic())
        rnd.pushes[worker] = (local, grads)
        rnd.waiters.append((ctx[0], ctx[1], worker))
        self._maybe_apply(t.name)
        return _DEFERRED

    def _maybe_apply(self, name: str) -> None:
        rnd = self.rounds.get(name)
        if rnd is None or not self.live.issubset(rnd.pushes):
            return
        t = self.tables[name]
        workers = sorted(rnd.pushes)  # fixed order: the sum does not depend on arrival
        if len(workers) == 1:
            rows, grads = rnd.pushes[workers[0]]
        else:
            rows = np.concatenate([rnd.pushes[w][0] for w in workers])
            grads = np.concatenate([rnd.pushes[w][1] for w in workers])
            grads /= np.float32(len(workers))  # mean over workers
        try:
            t.apply_grad(rows, grads, check=False)  # each push was checked when accepted
        except NonFiniteUpdateError as exc:
            # The update itself leaves float32 (momentum or weights, or the workers' sum):
            # nothing was changed; every worker of the step is told and may push it again.
            del self.rounds[name]
            self.errors += 1
            log.warning("table %r step %d not applied (workers %s): %s", name, rnd.step,
                        workers, exc)
            for env, rid, _w in rnd.waiters:
                self._send(env, {"ok": False, "id": rid, "error": (
                    f"step {rnd.step} of table {name!r} was not applied: {exc}. The table "
                    f"is still at step {t.updates}; push step {rnd.step} again")})
            return
        del self.rounds[name]
        log.debug("table %r step %d applied: workers %s, %d rows", name, rnd.step, workers,
                  rows.shape[0])
        for env, rid, _w in rnd.waiters:
            self._send(env, {"ok": True, "id": rid, "step": rnd.step, "workers": workers})

    def _expire_workers(self) -> None:
        now = time.monotonic()
        dropped = False
        for name, rnd in list(self.rounds.items()):
            if now - rnd.started < self.worker_timeout:
                continue
            for w in sorted(self.live - set(rnd.pushes)):
                self.live.discard(w)
                dropped = True
                log.warning("worker %d dropped: no push of step %d to table %r within "
                            "%.1f s (--worker-timeout); continuing with workers %s", w,
                            rnd.step, name, self.worker_timeout, sorted(self.live))
        if dropped:
            for name in list(self.rounds):
                self._maybe_apply(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paramserver",
        description="hfsoftmax parameter server: holds tables of float32 rows (the "
                    "classifier), answers pull/push over ZeroMQ and applies synchronous SGD "
                    "(torch.optim.SGD semantics) over --workers workers. Protocol: "
                    "paramserver/PROTOCOL.md.")
    p.add_argument("--bind", default=DEFAULT_BIND,
                   help="ZeroMQ address to listen on (default %(default)s; a port of * picks "
                        "a free one). A non-loopback address needs --curve-secret-key or "
                        "--insecure.")
    p.add_argument("--workers", type=int, default=1,
                   help="number of synchronous workers, ids 0..N-1: a step is applied once "
                        "each live worker pushed it (default %(default)s). Workers with other "
                        "ids join by the `register` op or their first push.")
    p.add_argument("--worker-timeout", type=float, default=60.0,
                   help="seconds a pending step waits for the missing workers before they "
                        "are dropped (logged) and the step is applied without them "
                        "(default %(default)s)")
    p.add_argument("--restore", metavar="PATH",
                   help="load this snapshot file before serving")
    p.add_argument("--snapshot-dir", metavar="DIR",
                   help="if set, snapshot/restore paths are relative to DIR and may not leave "
                        "it (default: any path the server process can write)")
    p.add_argument("--max-message-bytes", type=int, default=1 << 30,
                   help="largest message frame accepted and largest reply sent "
                        "(default %(default)s)")
    p.add_argument("--curve-secret-key", metavar="FILE",
                   help="the server's CURVE key pair (*.key_secret file from "
                        "`python -m paramserver.keys`): encrypt and authenticate clients")
    p.add_argument("--curve-public-keys-dir", metavar="DIR",
                   help="folder of the public *.key files of the clients allowed to connect "
                        "(with --curve-secret-key)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without authentication (logs a warning)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="write the bound address to PATH once serving (for scripts/tests)")
    p.add_argument("--stats-interval", type=float, default=60.0,
                   help="seconds between request-count log lines; 0 disables "
                        "(default %(default)s)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging level (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry ``hfsoftmax-paramserver``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        server = ParamServer(args.bind, workers=args.workers,
                             worker_timeout=args.worker_timeout,
                             max_message_bytes=args.max_message_bytes,
                             snapshot_dir=args.snapshot_dir, restore=args.restore,
                             curve_secret_key=args.curve_secret_key,
                             curve_public_keys_dir=args.curve_public_keys_dir,
                             insecure=args.insecure, ready_file=args.ready_file,
                             stats_interval=args.stats_interval)
    except (ValueError, OSError, zmq.ZMQError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGTERM, server.stop)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
