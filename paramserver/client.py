"""Client of the parameter server: one or several addresses (shards), scatter and gather.

>>> with ParamClient("tcp://127.0.0.1:5570", worker_id=0) as ps:   # doctest: +SKIP
...     ps.create_table("classifier", 100_000, 256, init="normal", std=0.01, seed=0)
...     ps.set_optimizer("classifier", lr=0.1, momentum=0.9, weight_decay=5e-4)
...     w = ps.pull("classifier", np.array([3, 17, 3]))          # (3, 256) float32
...     ps.push("classifier", np.array([3, 17, 3]), grad)         # waits for the step's update

With several addresses the rows of every table are split into contiguous ranges, shard ``i``
holding ``[i * N // S, (i + 1) * N // S)``; each shard initialises its rows from the global
row ids, so results are identical to one server. Every call waits for the reply(ies) and
raises :class:`ParamServerError` on an error reply or :class:`TimeoutError` when a server does
not answer in time. A client (its ZeroMQ sockets) must be used from one thread at a time;
make one client per thread.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import zmq

from .optim import SGDConfig
from .table import shard_bounds
from .wire import decode_arrays, decode_header, encode

__all__ = ["ParamClient", "ParamServerError"]

log = logging.getLogger(__name__)


class ParamServerError(RuntimeError):
    """The server answered ``{"ok": false}``; the message is the server's, with its address."""

    def __init__(self, address: str, op: str, message: str):
        super().__init__(f"{address} refused {op}: {message}")
        self.address, self.op, self.server_message = address, op, message


class _Conn:
    """A DEALER socket to one server; recreated after a timeout so a late reply to an
    abandoned request can never be taken for the answer to a new one."""

    def __init__(self, ctx: zmq.Context, address: str, curve: dict | None):
        self.ctx, self.address, self.curve = ctx, address, curve
        self.sock = None
        self.info: dict | None = None
        self._open()

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if self.curve:
            self.sock.curve_serverkey = self.curve["server_public"]
            self.sock.curve_publickey = self.curve["public"]
            self.sock.curve_secretkey = self.curve["secret"]
        self.sock.connect(self.address)

    def reset(self) -> None:
        self.sock.close(linger=0)
        self._open()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


def _load_key(value: str | bytes, secret: bool) -> bytes:
    """A Z85 key given directly or as a key file from ``zmq_auth.create_certificates``."""
    from zmq import auth as zmq_auth

    if isinstance(value, bytes) and len(value) == 40:
        return value
    if isinstance(value, str) and len(value) == 40 and not os.path.exists(value):
        return value.encode()
    public, sec = zmq_auth.load_certificate(str(value))
    if secret:
        if sec is None:
            raise ValueError(f"{value} holds no secret key; pass the *.key_secret file")
        return sec
    return public


class ParamClient:
    """Talk to one server or to several shards of one.

    ``addresses``: one address or a list (shards, in order; every client of a run must list
    them in the same order). ``worker_id``: this worker's id for synchronous SGD (the
    torch.distributed rank). ``timeout_s``: how long to wait for a reply; a push may wait
    ``timeout_s`` plus the server's worker timeout, since its reply comes when the step is
    applied. CURVE: ``curve_server_key`` (the server's public key file or Z85 string) and
    ``curve_secret_key`` (this client's ``*.key_secret`` file, whose public key must be in
    the server's ``--curve-public-keys-dir``).
    """

    def __init__(self, addresses: str | Sequence[str], *, worker_id: int = 0,
                 timeout_s: float = 30.0, curve_server_key: str | bytes | None = None,
                 curve_secret_key: str | None = None):
        if isinstance(addresses, str):
            addresses = [addresses]
        addresses = list(addresses)
        if not addresses or not all(isinstance(a, str) and "://" in a for a in addresses):
            raise ValueError(f"addresses must be ZeroMQ addresses like "
                             f"'tcp://127.0.0.1:5570', got {addresses!r}")
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"addresses repeat a shard: {addresses}")
        if not (isinstance(worker_id, int) and 0 <= worker_id < 2**31):
            raise ValueError(f"worker_id must be an int in [0, 2**31), got {worker_id!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        curve = None
        if (curve_server_key is None) != (curve_secret_key is None):
            raise ValueError("CURVE needs both curve_server_key (the server's public key) "
                             "and curve_secret_key (this client's *.key_secret file)")
        if curve_server_key is not None:
            from zmq import auth as zmq_auth

            public, secret = zmq_auth.load_certificate(str(curve_secret_key))
            if secret is None:
                raise ValueError(f"{curve_secret_key} holds no secret key; pass the client's "
                                 "*.key_secret file")
            curve = {"server_public": _load_key(curve_server_key, False), "public": public,
                     "secret": secret}
        self.addresses = addresses
        self.worker_id = worker_id
        self.timeout_s = float(timeout_s)
        self._ctx = zmq.Context()
        self._conns = [_Conn(self._ctx, a, curve) for a in addresses]
        self._ids = itertools.count(1)
        self._bounds: dict[str, np.ndarray] = {}   # table -> shard boundaries (S+1,)
        self._dims: dict[str, int] = {}
        self._steps: dict[str, int] = {}           # table -> last step this worker pushed

    # ----------------------------------------------------------------- transport
    def _request(self, shards: Sequence[int], headers: Sequence[dict],
                 arrays: Sequence[Sequence[np.ndarray]], timeout_s: float | None = None
                 ) -> list[tuple[dict, list[np.ndarray]]]:
        """Send one request per shard (all first, so shards work in parallel), then gather."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for i, hdr, arrs in zip(shards, headers, arrays):
            biggest = max((a.nbytes for a in arrs), default=0)
            if biggest > (1 << 24):  # big frame: check the server's limit (it would drop us)
                if self._conns[i].info is None:
                    self.ping()
                limit = int(self._conns[i].info.get("max_message_bytes", 0))
                if biggest > limit:
                    raise ValueError(f"{hdr['op']}: a frame of {biggest} bytes exceeds the "
                                     f"limit of {limit} bytes of {self.addresses[i]} "
                                     "(--max-message-bytes); send fewer rows per call")
        ids = []
        for i, hdr, arrs in zip(shards, headers, arrays):
            rid = next(self._ids)
            ids.append(rid)
            conn = self._conns[i]
            conn.sock.send_multipart([b""] + encode({**hdr, "id": rid}, arrs), copy=False)
        out = []
        error = None
        for i, hdr, rid in zip(shards, headers, ids):
            try:
                reply, arrs = self._receive(self._conns[i], rid, timeout)
            except TimeoutError as exc:
                error = error or exc
                continue
            if not reply.get("ok"):
                error = error or ParamServerError(self._conns[i].address, hdr["op"],
                                                  str(reply.get("error", "no message")))
                continue
            out.append((reply, arrs))
        if error is not None:
            raise error
        return out

    def _receive(self, conn: _Conn, rid: int, timeout: float):
        deadline = _now() + timeout
        while True:
            left = deadline - _now()
            if left <= 0 or not conn.sock.poll(int(math.ceil(left * 1000)), zmq.POLLIN):
                conn.reset()
                raise TimeoutError(f"no reply from parameter server {conn.address} within "
                                   f"{timeout:g} s (is it running and reachable? raise "
                                   "timeout_s for slow operations)")
            frames = conn.sock.recv_multipart(copy=False)
            if len(frames) < 2 or len(frames[0]) != 0:
                log.warning("ignoring a malformed reply from %s", conn.address)
                continue
            reply = decode_header(frames[1])
            if reply.get("id") != rid:
                log.debug("ignoring a late reply %r from %s", reply.get("id"), conn.address)
                continue
            return reply, decode_arrays(reply, frames[2:]) if len(frames) > 2 else []

    def _all(self, header: dict, timeout_s: float | None = None) -> list[dict]:
        n = len(self._conns)
        return [r for r, _ in self._request(range(n), [header] * n, [()] * n, timeout_s)]

    # --------------------------------------------------------------------- tables
    def ping(self) -> list[dict]:
        """Each shard's status (protocol version, live workers, tables and their steps)."""
        infos = self._all({"op": "ping"})
        for conn, info in zip(self._conns, infos):
            conn.info = info
        return infos

    def register(self) -> list[int]:
        """Make the servers wait for this worker in every step from now on."""
        return self._all({"op": "register", "worker": self.worker_id})[0]["workers"]

    def _ranges(self, num_rows: int) -> list[tuple[int, int]]:
        return shard_bounds(num_rows, len(self._conns))

    def create_table(self, name: str, num_rows: int, dim: int, *, init: str = "normal",
                     std: float = 0.01, seed: int = 0) -> bool:
        """Create a table (idempotent: same settings again is fine, different ones raise).
        Returns True if any shard created it now."""
        headers = [{"op": "create_table", "table": name, "num_rows": int(num_rows),
                    "dim": int(dim), "init": init, "std": float(std), "seed": int(seed),
                    "row_start": a, "row_stop": b} for a, b in self._ranges(int(num_rows))]
        replies = self._request(range(len(self._conns)), headers, [()] * len(headers))
        self._learn(name, [r["info"] for r, _ in replies])
        return any(r["created"] for r, _ in replies)

    def _learn(self, name: str, infos: list[dict]) -> None:
        bounds = [infos[0]["row_start"]]
        for info in infos:
            if info["row_start"] != bounds[-1]:
                raise ParamServerError(self.addresses[len(bounds) - 1], "table_info",
                                       f"table {name!r}: shards do not tile the rows "
                                       f"({[(i['row_start'], i['row_stop']) for i in infos]});"
                                       " list the addresses in the order of the shards")
            bounds.append(info["row_stop"])
        if bounds[0] != 0 or bounds[-1] != infos[0]["global_rows"]:
            raise ParamServerError(self.addresses[0], "table_info",
                                   f"table {name!r}: shards cover rows [{bounds[0]}, "
                                   f"{bounds[-1]}) of {infos[0]['global_rows']}")
        self._bounds[name] = np.asarray(bounds, dtype=np.int64)
        self._dims[name] = int(infos[0]["dim"])

    def _route(self, name: str) -> np.ndarray:
        if name not in self._bounds:
            self.table_info(name)
        return self._bounds[name]

    def table_info(self, name: str, checksum: bool = False) -> dict:
        """``num_rows`` (global), ``dim``, ``step``, ``optimizer`` and per-shard details
        (``shards``: each shard's own reply; with ``checksum=True`` a hash of its state)."""
        infos = self._all({"op": "table_info", "table": name, "checksum": bool(checksum)})
        self._learn(name, infos)
        first = infos[0]
        return {"num_rows": first["global_rows"], "dim": first["dim"],
                "step": first["step"], "optimizer": first["optimizer"], "init": first["init"],
                "std": first["std"], "seed": first["seed"], "shards": infos}

    def set_optimizer(self, name: str, lr: float, **settings) -> None:
        """SGD settings of a table: ``lr`` and any other :class:`~paramserver.optim.SGDConfig`
        field (``momentum``, ``weight_decay``, ``nesterov``, ``renorm``, ``max_norm``,
        ``catchup_decay``, ...; torch.optim.SGD's meaning, dampening 0), checked here as the
        server checks them, sent as one header field each."""
        cfg = SGDConfig(lr=lr, **settings)
        self._all({"op": "set_optimizer", "table": name, **cfg.to_dict()})

    def set_lr(self, name: str, lr: float) -> None:
        """Change the learning rate; the next applied step uses it."""
        self._all({"op": "set_lr", "table": name, "lr": float(lr)})

    # --------------------------------------------------------------------- rows
    def _split(self, name: str, rows: Any) -> tuple[np.ndarray, list[np.ndarray] | None]:
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
            raise ValueError(f"rows must be a 1-D array of integer row ids, got "
                             f"{rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64, copy=False)
        bounds = self._route(name)
        if rows.size and (rows.min() < 0 or rows.max() >= bounds[-1]):
            bad = rows[(rows < 0) | (rows >= bounds[-1])][0]
            raise IndexError(f"table {name!r}: row {int(bad)} outside [0, {int(bounds[-1])})")
        if len(self._conns) == 1:
            return rows, None
        shard = np.searchsorted(bounds, rows, side="right") - 1
        return rows, [np.flatnonzero(shard == i) for i in range(len(self._conns))]

    def pull(self, name: str, rows: Any) -> np.ndarray:
        """Rows (any int ids, duplicates allowed) as a float32 ``(len(rows), dim)`` array."""
        rows, parts = self._split(name, rows)
        if parts is None:
            (reply, arrs), = self._request([0], [{"op": "pull", "table": name}], [(rows,)])
            return np.array(arrs[0])  # own, writable memory
        dim = self._dims[name]
        out = np.empty((rows.shape[0], dim), dtype=np.float32)
        used = [i for i, p in enumerate(parts) if p.size]
        replies = self._request(used, [{"op": "pull", "table": name}] * len(used),
                                [(rows[parts[i]],) for i in used])
        for i, (_, arrs) in zip(used, replies):
            out[parts[i]] = arrs[0]
        return out

    def push(self, name: str, rows: Any, grads: Any, step: int | None = None) -> int:
        """Push this worker's gradient for ``rows`` (duplicates accumulate) for one step.

        ``step`` None: the step after this client's last push to the table (the first push
        asks the server for the table's step). Returns once the step has been applied on
        every shard (synchronous SGD), so a following pull sees the update. Returns the step.
        """
        rows, parts = self._split(name, rows)
        grads = np.ascontiguousarray(grads, dtype=np.float32)
        dim = self._dims[name]
        if grads.shape != (rows.shape[0], dim):
            raise ValueError(f"grads must have shape ({rows.shape[0]}, {dim}) for "
                             f"{rows.shape[0]} rows of table {name!r}, got {grads.shape}")
        if step is None:
            if name not in self._steps:
                self._steps[name] = self.table_info(name)["step"]
            step = self._steps[name] + 1
        hdr = {"op": "push", "table": name, "worker": self.worker_id, "step": int(step)}
        n = len(self._conns)
        arrays = [(rows, grads)] if parts is None else \
            [(rows[p], grads[p]) for p in parts]  # every shard gets a push, maybe empty
        self._request(range(n), [hdr] * n, arrays, self.timeout_s + self._worker_timeout())
        self._steps[name] = int(step)
        return int(step)

    def _worker_timeout(self) -> float:
        if any(c.info is None for c in self._conns):
            self.ping()
        return max(float(c.info.get("worker_timeout_s", 0.0)) for c in self._conns)

    def set_rows(self, name: str, rows: Any, values: Any) -> None:
        """Overwrite rows (momentum buffers unchanged; for a repeated id the last wins)."""
        rows, parts = self._split(name, rows)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if parts is None:
            self._request([0], [{"op": "set_rows", "table": name}], [(rows, values)])
            return
        used = [i for i, p in enumerate(parts) if p.size]
        self._request(used, [{"op": "set_rows", "table": name}] * len(used),
                      [(rows[parts[i]], values[parts[i]]) for i in used])

    def read_all(self, name: str, chunk_rows: int = 65536, field: str = "weight",
                 timeout_s: float | None = None) -> np.ndarray:
        """The whole table (``field="momentum"``: its momentum buffers) as float32, read in
        chunks of at most ``chunk_rows`` rows per message."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        bounds = self._route(name)
        out = np.empty((int(bounds[-1]), self._dims[name]), dtype=np.float32)
        for i in range(len(self._conns)):
            for a in range(int(bounds[i]), int(bounds[i + 1]), chunk_rows):
                b = min(a + chunk_rows, int(bounds[i + 1]))
                (_, arrs), = self._request([i], [{"op": "read", "table": name, "start": a,
                                                  "stop": b, "field": field}], [()], timeout_s)
                out[a:b] = arrs[0]
        return out

    # ------------------------------------------------------------------ snapshots
    # Paths are relative to each server's snapshot folder (its --snapshot-dir; `ping` tells
    # where it is): a server refuses absolute paths, '..' and symbolic links.
    def shard_paths(self, path: str | os.PathLike) -> list[str]:
        """Files a snapshot at ``path`` consists of: ``path`` itself for one server, else
        ``path.00000-of-00003`` ... one per shard."""
        from .reshard import shard_file_names

        return shard_file_names(path, len(self._conns))

    @staticmethod
    def _tables_field(tables: Sequence[str] | None) -> dict:
        if tables is None:
            return {}
        if isinstance(tables, str):
            raise ValueError(f"tables must be a list of table names, got the string {tables!r}")
        return {"tables": [str(t) for t in tables]}

    def snapshot(self, path: str | os.PathLike, tables: Sequence[str] | None = None,
                 timeout_s: float | None = None) -> list[dict]:
        """Each shard writes its tables (``tables``: only these; default all) atomically to
        its file (see :meth:`shard_paths`), ``path`` being relative to the servers' snapshot
        folder (sub-folders are created). Returns the shards' replies."""
        paths = self.shard_paths(path)
        n = len(paths)
        headers = [{"op": "snapshot", "path": p, "shard_index": i, "shard_count": n,
                    **self._tables_field(tables)} for i, p in enumerate(paths)]
        return [r for r, _ in self._request(range(n), headers, [()] * n,
                                            timeout_s or max(self.timeout_s, 600.0))]

    def restore(self, path: str | os.PathLike, tables: Sequence[str] | None = None,
                timeout_s: float | None = None) -> list[dict]:
        """Each shard restores the tables of its snapshot file (``tables``: only these, which
        must be in the file; default every table in it), replacing those tables and leaving
        every other table as it is. The file must be that shard's (index and count are
        checked before anything changes). Refused for a table with a step pending. With
        several shards, every shard first reads and checks its file (``check``: nothing
        changes); only when all would succeed do they restore, so a missing, corrupt or
        misplaced file of one shard leaves every shard as it was."""
        paths = self.shard_paths(path)
        n = len(paths)
        timeout = timeout_s or max(self.timeout_s, 600.0)
        headers = [{"op": "restore", "path": p, "shard_index": i, "shard_count": n,
                    **self._tables_field(tables)} for i, p in enumerate(paths)]
        if n > 1:
            self._request(range(n), [{**h, "check": True} for h in headers], [()] * n, timeout)
        replies = [r for r, _ in self._request(range(n), headers, [()] * n, timeout)]
        for name in {t for r in replies for t in r["tables"]}:  # restored: routing may differ
            self._bounds.pop(name, None)
            self._dims.pop(name, None)
            self._steps.pop(name, None)
        return replies

    def delete_snapshot(self, path: str | os.PathLike, timeout_s: float | None = None
                        ) -> list[dict]:
        """Delete a snapshot (each shard its file, see :meth:`shard_paths`): how a trainer
        prunes old snapshots on a server it cannot reach by file system. Each file must be a
        snapshot inside the server's snapshot folder."""
        paths = self.shard_paths(path)
        n = len(paths)
        headers = [{"op": "delete_snapshot", "path": p} for p in paths]
        return [r for r, _ in self._request(range(n), headers, [()] * n, timeout_s)]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the sockets (idempotent)."""
        for c in self._conns:
            c.close()
        if not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> "ParamClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the documented way
        try:
            self.close()
        except Exception:
            pass


_now = time.monotonic
