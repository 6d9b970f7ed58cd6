"""The server's table and snapshot operations: each checks its whole request, then acts.

A handler takes ``(header, arrays, request)`` and returns ``(reply fields, reply arrays)``;
a refused request raises :class:`RequestError` (or ``ValueError`` / ``IndexError``) whose
message goes back to the client and changes nothing. The handlers live in
:class:`TableOps`, a mixin of :class:`paramserver.server.ParamServer` (which owns the
tables, the socket loop and the synchronous-SGD state of :mod:`paramserver.sync`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .limits import memory_shortfall
from .optim import SGDConfig
from .snapcheck import SnapshotError, SnapshotFile, open_snapshot
from .snapshot import write_snapshot
from .table import INITS, MAX_DIM, Table, check_name
from .wire import PROTOCOL_VERSION

__all__ = ["RequestError", "TableOps", "Request", "short"]

log = logging.getLogger("paramserver")

MAX_INT = (1 << 63) - 1
_MAX_TABLE_LIST = 4096


class RequestError(ValueError):
    """A request the server refuses; its message goes back to the client verbatim."""


@dataclass
class Request:
    """Where a request came from: the reply envelope, its id, and the connection's routing
    id (the key of everything the server binds to a connection)."""

    envelope: list
    rid: Any
    peer: bytes
    op: str | None = None


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that quote client input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Header:
    """Typed access to a request header with errors that name the field and the fix.
    Unknown fields are refused, naming at most three of them (cut short): a message never
    echoes a hostile header whole."""

    def __init__(self, header: dict, allowed: set[str]):
        extra = sorted(set(header) - allowed - {"op", "id", "arrays"})
        if extra:
            shown = ", ".join(short(k, 34) for k in extra[:3])
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise RequestError(f"op {short(header.get('op'))}: unknown header field(s) "
                               f"{shown}{more}; valid: {sorted(allowed)}")
        self.h = header

    def get(self, name: str, kind: str, default: Any = ..., lo: float | None = None,
            hi: float | None = None) -> Any:
        if name not in self.h:
            if default is ...:
                raise RequestError(f"op {short(self.h.get('op'))}: missing header field "
                                   f"{name!r}")
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
            raise RequestError(f"op {short(self.h.get('op'))}: field {name!r} must be {kind}, "
                               f"got {short(v)}")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise RequestError(f"op {short(self.h.get('op'))}: field {name!r}={short(v)} "
                               f"outside [{lo}, {hi}]")
        return v

    def tables(self) -> list[str] | None:
        """The optional ``tables`` field: a non-empty list of distinct table names."""
        names = self.h.get("tables")
        if names is None:
            return None
        if not isinstance(names, list) or not 1 <= len(names) <= _MAX_TABLE_LIST:
            raise RequestError(f"field 'tables' must be a list of 1 to {_MAX_TABLE_LIST} table "
                               f"names, got {short(names)}")
        for n in names:
            check_name(n)
        if len(set(names)) != len(names):
            raise RequestError(f"field 'tables' names a table twice: {short(names)}")
        return names


def _expect(arrays: list, specs: list[tuple[str, str, int]], op: str) -> None:
    """Check the array frames' count, dtypes and ranks: specs = (name, dtype, ndim)."""
    if len(arrays) != len(specs):
        raise RequestError(f"op {op!r} takes {len(specs)} array frame(s) "
                           f"({', '.join(s[0] for s in specs) or 'none'}), got {len(arrays)}")
    for a, (name, dtype, ndim) in zip(arrays, specs):
        if a.dtype != np.dtype(dtype).newbyteorder("<") or a.ndim != ndim:
            raise RequestError(f"op {op!r}: {name} must be {ndim}-D {dtype}, got "
                               f"{a.ndim}-D {a.dtype.name}")


class TableOps:
    """Table and snapshot ops (a mixin: ``self`` is the :class:`ParamServer`)."""

    # ----------------------------------------------------------------------- helpers
    def _table(self, h: Header) -> Table:
        name = h.get("table", "str")
        t = self.tables.get(name)
        if t is None:
            raise RequestError(f"no table {short(name)}; tables: {sorted(self.tables)[:20]} "
                               "(create it with create_table)")
        return t

    def _local_rows(self, t: Table, rows: np.ndarray) -> np.ndarray:
        local = rows - t.row_start
        t.check_rows(local)
        return local

    def _held_bytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())

    def _info(self, t: Table) -> dict:
        rnd = self.rounds.get(t.name)
        return {"table": t.name, "global_rows": t.global_rows, "row_start": t.row_start,
                "row_stop": t.row_start + t.num_rows, "num_rows": t.num_rows, "dim": t.dim,
                "init": t.init, "std": t.std, "seed": t.seed, "optimizer": t.optim.to_dict(),
                "step": t.updates,
                "pending": None if rnd is None else {"step": rnd.step,
                                                     "workers": sorted(rnd.pushes)}}

    # --------------------------------------------------------------------------- ops
    def op_ping(self, header, arrays, req):
        Header(header, set())
        _expect(arrays, [], "ping")
        return {"server": "hfsoftmax-paramserver", "protocol": PROTOCOL_VERSION,
                "workers": sorted(self.live), "max_workers": self.workers.count,
                "worker_timeout_s": self.worker_timeout,
                "max_message_bytes": self.max_message_bytes,
                "max_header_bytes": self.max_header_bytes,
                "snapshot_dir": str(self.snapdir.root),
                "tables": {n: t.updates for n, t in self.tables.items()}}, ()

    def op_create_table(self, header, arrays, req):
        h = Header(header, {"table", "num_rows", "dim", "init", "std", "seed", "row_start",
                            "row_stop"})
        _expect(arrays, [], "create_table")
        name = check_name(h.get("table", "str"))
        num_rows = h.get("num_rows", "int", lo=1, hi=MAX_INT)
        dim = h.get("dim", "int", lo=1, hi=MAX_DIM)
        init = h.get("init", "str", "normal")
        if init not in INITS:
            raise RequestError(f"unknown init {short(init)}; valid: {', '.join(INITS)}")
        std = h.get("std", "float", 0.01, lo=0.0, hi=1e6)
        seed = h.get("seed", "int", 0, lo=0, hi=MAX_INT)
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
        why = memory_shortfall(nbytes, self._held_bytes(),
                               f"table {name!r} ({row_stop - row_start} rows x {dim})")
        if why:
            raise RequestError(why)
        t = Table(name, row_stop - row_start, dim, init=init, std=std, seed=seed,
                  row_start=row_start, global_rows=num_rows)
        self.tables[name] = t
        log.info("created table %r: rows [%d, %d) of %d, dim %d, init %s std %g seed %d",
                 name, row_start, row_stop, num_rows, dim, init, std, seed)
        return {"created": True, "info": self._info(t)}, ()

    def op_set_optimizer(self, header, arrays, req):
        h = Header(header, {"table", "lr", "momentum", "weight_decay", "nesterov", "renorm",
                            "max_norm", "catchup_decay"})
        _expect(arrays, [], "set_optimizer")
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

    def op_set_lr(self, header, arrays, req):
        h = Header(header, {"table", "lr"})
        _expect(arrays, [], "set_lr")
        t = self._table(h)
        cfg = SGDConfig(**{**t.optim.to_dict(), "lr": h.get("lr", "float")})
        if cfg.lr != t.optim.lr:
            log.info("table %r lr %g -> %g at step %d", t.name, t.optim.lr, cfg.lr, t.updates)
        t.optim = cfg
        return {"optimizer": cfg.to_dict()}, ()

    def op_pull(self, header, arrays, req):
        h = Header(header, {"table"})
        t = self._table(h)
        _expect(arrays, [("rows", "int64", 1)], "pull")
        rows = arrays[0]
        if rows.shape[0] * t.dim * 4 > self.max_message_bytes:
            raise RequestError(f"pull of {rows.shape[0]} rows of {t.dim} exceeds the reply "
                               f"limit of {self.max_message_bytes} bytes; pull fewer rows")
        return {"step": t.updates}, (t.pull(self._local_rows(t, rows)),)

    def op_set_rows(self, header, arrays, req):
        h = Header(header, {"table"})
        t = self._table(h)
        _expect(arrays, [("rows", "int64", 1), ("values", "float32", 2)], "set_rows")
        rows, values = arrays
        t.set_rows(rows - t.row_start, values)
        return {"rows": int(rows.shape[0])}, ()

    def op_read(self, header, arrays, req):
        h = Header(header, {"table", "start", "stop", "field"})
        t = self._table(h)
        _expect(arrays, [], "read")
        stop_max = t.row_start + t.num_rows
        start = h.get("start", "int", t.row_start, lo=t.row_start, hi=stop_max)
        stop = h.get("stop", "int", stop_max, lo=start, hi=stop_max)
        fld = h.get("field", "str", "weight")
        if fld not in ("weight", "momentum"):
            raise RequestError(f"read field {short(fld)} unknown; valid: weight, momentum")
        if (stop - start) * t.dim * 4 > self.max_message_bytes:
            raise RequestError(f"read of rows [{start}, {stop}) exceeds the reply limit of "
                               f"{self.max_message_bytes} bytes; read in smaller chunks")
        lo, hi = start - t.row_start, stop - t.row_start
        # copies (zmq sends later); the weights as Table.read gives them (owed decay applied)
        values = t.read(lo, hi) if fld == "weight" else t.momentum[lo:hi].copy()
        return {"start": start, "stop": stop, "step": t.updates}, (values,)

    def op_table_info(self, header, arrays, req):
        h = Header(header, {"table", "checksum"})
        t = self._table(h)
        _expect(arrays, [], "table_info")
        info = self._info(t)
        if h.get("checksum", "bool", False):
            info["checksum"] = t.checksum()
        return info, ()

    # --------------------------------------------------------------------- snapshots
    def _shard(self, h: Header, default: tuple | None) -> tuple:
        count = h.get("shard_count", "int", default and default[1], lo=1, hi=1 << 20)
        index = h.get("shard_index", "int", default and default[0], lo=0,
                      hi=(count or 1) - 1)
        return index, count

    def op_snapshot(self, header, arrays, req):
        h = Header(header, {"path", "shard_index", "shard_count", "tables"})
        _expect(arrays, [], "snapshot")
        rel = self.snapdir.normalize(h.get("path", "str"))
        index, count = self._shard(h, (0, 1))
        names = h.tables()
        missing = [n for n in names or () if n not in self.tables]
        if missing:
            raise RequestError(f"snapshot: no table(s) {missing[:5]} on this server; tables: "
                               f"{sorted(self.tables)[:20]}")
        chosen = {n: self.tables[n] for n in (names or sorted(self.tables))}
        folder = self.snapdir.root.joinpath(*rel.split("/")[:-1])
        t0 = time.monotonic()
        try:
            size = self.snapdir.write(rel, lambda dfd, name: write_snapshot(
                name, chosen, {"shard_index": index, "shard_count": count}, dir_fd=dfd,
                folder_label=folder))
        except OSError as exc:
            raise RequestError(f"snapshot to {rel!r} failed: {exc.strerror or exc}") from None
        steps = {n: t.updates for n, t in chosen.items()}
        log.info("snapshot %s: %d table(s) %s, %.1f MB in %.2f s", folder / rel.split("/")[-1],
                 len(chosen), steps, size / 1e6, time.monotonic() - t0)
        return {"path": rel, "bytes": size, "tables": steps}, ()

    def op_restore(self, header, arrays, req):
        h = Header(header, {"path", "shard_index", "shard_count", "check", "tables"})
        _expect(arrays, [], "restore")
        rel = self.snapdir.normalize(h.get("path", "str"))
        index, count = self._shard(h, None)
        check = h.get("check", "bool", False)
        names = h.tables()
        try:
            f = self.snapdir.open_read(rel)
        except OSError as exc:
            raise RequestError(f"restore from {rel!r} failed: {exc.strerror or exc}") from None
        with open_snapshot(f, label=repr(rel)) as snap:
            have = (snap.shard_index, snap.shard_count)
            want = (index if index is not None else have[0],
                    count if count is not None else have[1])
            if have != want:
                raise RequestError(f"{rel!r} is shard {have[0]} of {have[1]}, not "
                                   f"{want[0]} of {want[1]}; nothing was restored")
            names = snap.select(names)
            busy = {n: self.rounds[n].step for n in names if n in self.rounds}
            if busy:
                raise RequestError(f"cannot restore tables with a step pending: {busy}; "
                                   "restore before the workers push")
            why = memory_shortfall(snap.nbytes(names), self._held_bytes(),
                                   f"restoring {len(names)} table(s) from {rel!r}")
            if why:
                raise RequestError(why)
            tables = snap.load(names)
        steps = {n: t.updates for n, t in tables.items()}
        if check:  # the first phase of a sharded restore: the file would do; nothing changes
            log.info("checked %s for a restore: %d table(s), steps %s", rel, len(tables), steps)
        else:
            self.tables.update(tables)  # tables the request did not name stay as they are
            log.info("restored %d table(s) from %s: steps %s", len(tables), rel, steps)
        return {"path": rel, "tables": steps, "check": check, "shard_index": have[0],
                "shard_count": have[1]}, ()

    def op_delete_snapshot(self, header, arrays, req):
        h = Header(header, {"path"})
        _expect(arrays, [], "delete_snapshot")
        rel = self.snapdir.normalize(h.get("path", "str"))
        def is_snapshot(f, shown):
            try:
                SnapshotFile(f, shown)  # its header: format, tables, offsets
            except SnapshotError as exc:
                raise RequestError(f"delete_snapshot removes only snapshot files; {exc}") \
                    from None

        try:
            size = self.snapdir.delete(rel, is_snapshot)
        except OSError as exc:
            raise RequestError(f"delete_snapshot of {rel!r} failed: "
                               f"{exc.strerror or exc}") from None
        log.info("deleted snapshot %s (%d bytes)", rel, size)
        return {"path": rel, "bytes": size}, ()
