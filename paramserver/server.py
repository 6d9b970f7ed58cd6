"""The parameter server process: one ZeroMQ ROUTER socket served by one thread.

A single socket and a single-threaded loop, so no locks and every request is handled in
arrival order. Requests are answered at once, except ``push``: its reply is sent when the
synchronous step it belongs to has been applied (:mod:`paramserver.sync`); the ROUTER keeps
serving the other clients meanwhile. Every request is validated in full before anything
changes (:mod:`paramserver.ops`); a bad one gets ``{"ok": false, "error": ...}``.

What a hostile client can make the server hold is bounded here (``PROTOCOL.md``, "Trust
model"): the header frame is size- and depth-checked before parsing; ZeroMQ queues at most
``limits.SNDHWM`` replies per connection (``ROUTER_MANDATORY`` reports a full queue instead
of blocking), the server keeps up to ``--max-queued-bytes`` more for a connection that
reads slower than it asks and sends them as it reads; past that, the connection's replies
are dropped and its requests ignored until it disconnects (logged once); ZeroMQ heartbeats close connections whose peer
vanished and a handshake timeout those that never speak ZeroMQ. A connection presenting a
routing id already in use is not read until the first one leaves (no ``ROUTER_HANDOVER``),
so it can never receive another client's replies. Closed connections are learnt from the
socket monitor (matched to routing ids by the file descriptor each message came from), to
free the worker ids they owned.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import limits
from .fileio import atomic_write
from .ops import Request, RequestError, TableOps, short
from .snapcheck import open_snapshot
from .snapdir import DEFAULT_SNAPSHOT_DIR, SnapshotDir
from .snapshot import SnapshotError, remove_stale_temp_files
from .sync import DEFERRED, SyncOps, Workers
from .table import Table
from .wire import ProtocolError, decode_arrays, decode_header, encode

__all__ = ["ParamServer", "RequestError", "is_loopback", "DEFAULT_BIND"]

log = logging.getLogger("paramserver")

DEFAULT_BIND = "tcp://127.0.0.1:5570"
_MAX_MUTED = 1 << 16
# Frames a request may have: routing id, delimiter, header, at most 2 arrays. Further frames
# are received and dropped one by one (never listed), so a message of a million empty
# frames costs the server ZeroMQ's own buffering, not a Python object per frame.
MAX_FRAMES = 5


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


class ParamServer(TableOps, SyncOps):
    """One server process (or shard). Not thread-safe: run :meth:`serve_forever` in one
    thread; :meth:`stop` may be called from a signal handler. Numeric settings are checked
    against :data:`paramserver.limits.FLAG_RANGES` (``ValueError`` naming the flag)."""

    def __init__(self, bind: str = DEFAULT_BIND, *, workers: int = 1,
                 worker_timeout: float = 60.0,
                 max_message_bytes: int = limits.DEFAULT_MAX_MESSAGE_BYTES,
                 max_header_bytes: int = limits.DEFAULT_MAX_HEADER_BYTES,
                 max_queued_bytes: int = limits.DEFAULT_MAX_QUEUED_BYTES,
                 snapshot_dir: str | os.PathLike = DEFAULT_SNAPSHOT_DIR,
                 restore: str | None = None, curve_secret_key: str | None = None,
                 curve_public_keys_dir: str | None = None, insecure: bool = False,
                 ready_file: str | None = None, stats_interval: float = 60.0):
        for name, value in (("workers", workers), ("worker_timeout", worker_timeout),
                            ("max_message_bytes", max_message_bytes),
                            ("max_header_bytes", max_header_bytes),
                            ("max_queued_bytes", max_queued_bytes),
                            ("stats_interval", stats_interval)):
            limits.check_flag(name, value)
        if not re.fullmatch(r"(tcp|ipc|inproc)://\S+", bind):
            raise ValueError(f"--bind {short(bind)} is not a ZeroMQ address like "
                             f"{DEFAULT_BIND}, ipc:///path or tcp://*:5570")
        if max_header_bytes * 16 > max_message_bytes:
            raise ValueError(f"--max-header-bytes {max_header_bytes} must be at most 1/16 of "
                             f"--max-message-bytes {max_message_bytes}")
        self.workers = Workers(int(workers))
        self.live: set[int] = set(range(workers))
        self.worker_timeout = float(worker_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.max_header_bytes = int(max_header_bytes)
        self.max_queued_bytes = int(max_queued_bytes)
        self.snapdir = SnapshotDir(snapshot_dir)
        self.tables: dict[str, Table] = {}
        self.rounds: dict = {}
        self.stats: dict[str, int] = {}
        self.errors = 0
        self.stats_interval = stats_interval
        self._stop = False
        self._auth = None
        self._peer_fd: dict[bytes, int] = {}
        self._fd_peers: dict[int, set[bytes]] = {}
        self._muted: OrderedDict[bytes, int] = OrderedDict()
        self._backlog: dict[bytes, deque] = {}    # peer -> replies ZeroMQ had no room for
        self._backlog_bytes: dict[bytes, int] = {}
        # Temp files of snapshot writes that a kill -9 interrupted (this process writes none
        # yet, so even a file with its own pid is a leftover); each removal is logged.
        remove_stale_temp_files(self.snapdir.root, own_pid_is_stale=True)
        if restore:
            self._restore_at_start(restore)

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self.sock.setsockopt(zmq.SNDHWM, limits.SNDHWM)
        self.sock.setsockopt(zmq.RCVHWM, limits.RCVHWM)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue raises, never blocks
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, int(limits.HEARTBEAT_IVL_S * 1000))
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(limits.HEARTBEAT_TIMEOUT_S * 1000))
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, int(limits.HANDSHAKE_S * 1000))
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
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
        try:
            self.sock.bind(bind)
        except zmq.ZMQError:
            self.close()
            raise
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("serving on %s (workers %s, worker timeout %.1f s, curve %s, snapshot "
                 "folder %s)", self.address, sorted(self.live), self.worker_timeout,
                 "on" if curve_secret_key else "off", self.snapdir.root)
        if ready_file:
            with atomic_write(ready_file, "w") as f:
                f.write(self.address + "\n")

        self.handlers: dict[str, Callable] = {
            "ping": self.op_ping, "register": self.op_register,
            "create_table": self.op_create_table, "set_optimizer": self.op_set_optimizer,
            "set_lr": self.op_set_lr, "pull": self.op_pull, "push": self.op_push,
            "set_rows": self.op_set_rows, "read": self.op_read, "table_info": self.op_table_info,
            "snapshot": self.op_snapshot, "restore": self.op_restore,
            "delete_snapshot": self.op_delete_snapshot,
        }

    # ----------------------------------------------------------------- setup / teardown
    def _restore_at_start(self, restore: str) -> None:
        """``--restore``: the operator's own file (absolute, or relative to the snapshot
        folder); links are followed, but it must be a regular file."""
        path = Path(restore)
        path = path if path.is_absolute() else self.snapdir.root / path
        remove_stale_temp_files(path.parent, own_pid_is_stale=True)
        try:
            with open_snapshot(path, label=repr(str(path))) as snap:
                why = limits.memory_shortfall(snap.nbytes(list(snap.tables)), 0,
                                              f"{len(snap.tables)} table(s)")
                if why:
                    raise SnapshotError(why)
                self.tables = snap.load()
        except SnapshotError as exc:
            raise SnapshotError(f"--restore {restore!r}: {exc}; nothing was restored") from None
        log.info("restored %d table(s) from %s: %s", len(self.tables), path,
                 {n: t.updates for n, t in self.tables.items()})

    def _setup_curve(self, secret_key_file: str, public_keys_dir: str | None) -> None:
        from zmq import auth as zmq_auth
        from zmq.auth.thread import ThreadAuthenticator

        if not public_keys_dir or not Path(public_keys_dir).is_dir():
            self.close()
            raise ValueError("--curve-secret-key needs --curve-public-keys-dir, a folder of "
                             "the allowed clients' public *.key files; got "
                             f"{public_keys_dir!r}")
        try:
            public, secret = zmq_auth.load_certificate(secret_key_file)
        except (OSError, ValueError) as exc:
            self.close()
            raise ValueError(f"--curve-secret-key {secret_key_file!r} cannot be read: {exc}")
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
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()

    # ----------------------------------------------------------------------- main loop
    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; pending pushes then get an error reply."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        last_stats = time.monotonic()
        try:
            while not self._stop:
                timeout_ms = 2 if self._backlog else 100  # retry queued replies soon
                if self.rounds:
                    first = min(r.started for r in self.rounds.values()) + self.worker_timeout
                    timeout_ms = max(0, min(timeout_ms, int((first - time.monotonic()) * 1000)
                                            + 1))
                poller.poll(timeout_ms)
                self._drain_monitor()
                self._flush_backlog()
                for _ in range(1000):  # drain, but keep checking timeouts and signals
                    try:
                        frames = self._recv()
                    except zmq.Again:
                        break
                    self._drain_monitor()  # a closed connection's fd may now be reused
                    self.handle(frames)
                    del frames  # free a big message before the next one is received
                self._expire_workers()
                now = time.monotonic()
                if self.stats_interval > 0 and now - last_stats >= self.stats_interval:
                    log.info("requests %s, errors %d, steps %s", dict(sorted(self.stats.items())),
                             self.errors, {n: t.updates for n, t in self.tables.items()})
                    last_stats = now
        finally:
            for name, rnd in list(self.rounds.items()):
                for req, _w in rnd.waiters:
                    self.send(req, {"ok": False, "error": "server stopping; step "
                                    f"{rnd.step} of table {name!r} was not applied"})
            self.rounds.clear()
            log.info("stopped")
            self.close()

    # ------------------------------------------------------------------- connections
    def _recv(self) -> list:
        """One message's frames (``zmq.Again`` if none waits), at most :data:`MAX_FRAMES`
        of them kept; the count of frames dropped beyond is appended as an int."""
        frame = self.sock.recv(zmq.NOBLOCK, copy=False)
        frames = [frame]
        dropped = 0
        while frame.more:
            frame = self.sock.recv(copy=False)
            if len(frames) < MAX_FRAMES:
                frames.append(frame)
            else:
                dropped += 1
        if dropped:
            frames.append(dropped)
        return frames

    def _drain_monitor(self) -> None:
        """Forget the connections ZeroMQ closed: free their worker ids, unmute them."""
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            for peer in self._fd_peers.pop(int(event["value"]), ()):
                self._peer_fd.pop(peer, None)
                self._muted.pop(peer, None)
                self._backlog.pop(peer, None)
                self._backlog_bytes.pop(peer, None)
                freed = self.workers.release_peer(peer)
                if freed:
                    log.info("connection %s closed; worker id(s) %s are free", peer.hex(),
                             freed)

    def _track(self, frame: zmq.Frame, peer: bytes) -> None:
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError):  # a libzmq without it: ids freed by timeout
            return
        old = self._peer_fd.get(peer)
        if old != fd:
            if old is not None:
                self._fd_peers.get(old, set()).discard(peer)
            self._peer_fd[peer] = fd
            self._fd_peers.setdefault(fd, set()).add(peer)

    def _mute(self, peer: bytes) -> None:
        """Stop serving a connection that does not read its replies: drop what is queued
        for it, ignore its requests until it disconnects."""
        dropped = len(self._backlog.pop(peer, ()))
        self._backlog_bytes.pop(peer, None)
        if peer not in self._muted:
            log.warning("connection %s does not read its replies (%d queued by ZeroMQ and "
                        "--max-queued-bytes %d more): %d dropped, and its requests are "
                        "ignored until it disconnects", peer.hex(), limits.SNDHWM,
                        self.max_queued_bytes, dropped + 1)
            while len(self._muted) >= _MAX_MUTED:
                self._muted.popitem(last=False)
            self._muted[peer] = 0
        self._muted[peer] += dropped + 1
        self.stats["dropped_replies"] = self.stats.get("dropped_replies", 0) + dropped + 1

    def _try_send(self, peer: bytes, frames: list) -> bool:
        """Hand ``frames`` to ZeroMQ without blocking; False when the connection's queue is
        full. A closed connection's reply is dropped (True)."""
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the connection closed meanwhile
            log.info("reply to connection %s dropped: %s", peer.hex(), exc)
            self._backlog.pop(peer, None)
            self._backlog_bytes.pop(peer, None)
        return True

    def _flush_backlog(self) -> None:
        """Send the queued replies their connections now have room for, in order."""
        for peer in list(self._backlog):
            queue = self._backlog.get(peer)
            while queue:
                frames, size = queue[0]
                if not self._try_send(peer, frames):
                    break
                if peer not in self._backlog:  # the connection closed
                    break
                queue.popleft()
                self._backlog_bytes[peer] -= size
            if not queue and peer in self._backlog:
                del self._backlog[peer], self._backlog_bytes[peer]

    def send(self, req: Request, header: dict, arrays: tuple = ()) -> None:
        """Reply to ``req`` (``header`` holds ``ok``; the request id is added). Never blocks
        and never raises: a reply ZeroMQ has no room for waits in the connection's backlog
        (``--max-queued-bytes``; past it the connection is muted)."""
        if req.peer in self._muted:
            return
        try:
            frames = encode({"ok": header["ok"], "id": req.rid, **header}, arrays)
        except (ValueError, TypeError) as exc:  # a reply that is not JSON: a bug
            log.exception("cannot encode a reply")
            frames = encode({"ok": False, "id": req.rid,
                             "error": f"internal server error: {short(exc, 200)}"})
        frames = req.envelope + frames
        if req.peer not in self._backlog and self._try_send(req.peer, frames):
            return
        size = sum(f.nbytes if hasattr(f, "nbytes") else len(f) for f in frames)
        queue = self._backlog.setdefault(req.peer, deque())
        used = self._backlog_bytes.get(req.peer, 0)
        if queue and used + size > self.max_queued_bytes:
            self._mute(req.peer)
            return
        queue.append((frames, size))
        self._backlog_bytes[req.peer] = used + size

    def handle(self, frames: list) -> None:
        """Handle one request ``[identity, b"", header, arrays...]`` and reply (maybe later).
        Empties ``frames``: a big request is freed before its reply goes out, so a client
        waiting for the reply cannot make the server hold two of its messages."""
        peer = frames[0].bytes
        if peer in self._muted:
            self.stats["ignored"] = self.stats.get("ignored", 0) + 1
            return
        self._track(frames[0], peer)
        req = Request([frames[0], b""], None, peer)
        result: Any = None
        error = None
        try:
            result = self._dispatch(frames, req)
        except (ProtocolError, RequestError, SnapshotError, ValueError, IndexError) as exc:
            error = str(exc)
            log.info("refused %s: %s", req.op or "request",
                     error if len(error) <= 1000 else error[:1000] + "...")
        except MemoryError:
            error = f"server out of memory handling {req.op or 'a request'}"
            log.error("out of memory handling %s", req.op)
        except Exception as exc:  # a bug: keep serving, tell the client, log the traceback
            error = f"internal server error: {type(exc).__name__}: {short(exc, 200)}"
            log.exception("internal error handling %s", req.op)
        # Out of the except blocks: the exception and its traceback (which holds the
        # frames) are gone. A push keeps its own references to its arrays.
        frames.clear()
        if error is not None:
            self.errors += 1
            self.send(req, {"ok": False, "error": error})
        elif result is not DEFERRED:
            reply, out = result
            self.send(req, {"ok": True, **reply}, out)

    def _dispatch(self, frames: list, req: Request) -> Any:
        """Check the framing and the header, then run the op (named in ``req.op``); returns
        the handler's result."""
        if isinstance(frames[-1], int):
            raise ProtocolError(f"message has {len(frames) - 2 + frames[-1]} frames after the "
                                f"delimiter; a request has a header and at most "
                                f"{MAX_FRAMES - 3} array frames")
        if len(frames) < 3 or len(frames[1]) != 0:
            raise ProtocolError(
                f"message must be [empty delimiter frame, JSON header frame, array frames"
                f"...]; got {len(frames) - 1} frame(s)"
                + ("" if len(frames) < 2 or len(frames[1]) == 0
                   else " with a non-empty first frame"))
        header = decode_header(frames[2], max_bytes=self.max_header_bytes)
        rid = header.get("id")
        if rid is not None and not (type(rid) is int and -(1 << 63) <= rid < (1 << 63)
                                    or isinstance(rid, str) and len(rid) <= 128):
            raise ProtocolError("header 'id' must be a 64-bit integer or a string of at "
                                "most 128 characters")
        req.rid = rid
        op = header.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            raise RequestError(f"unknown op {short(op)}; valid: "
                               f"{', '.join(sorted(self.handlers))}")
        req.op = op
        arrays = decode_arrays(header, frames[3:])
        self.stats[op] = self.stats.get(op, 0) + 1
        return handler(header, arrays, req)
