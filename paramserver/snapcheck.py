"""Reading snapshot files, every field checked before anything is returned.

A snapshot may come from anywhere (copied between machines, edited, truncated), and a
restore must never leave a table the server cannot step or serve, so the whole header is
checked first (:func:`open_snapshot`): its size and JSON nesting, table names, shapes and
settings, step counters (integers in ``[0, MAX_STEP]``; ``Infinity``, ``NaN`` and floats
are refused), and tensor data offsets (inside the file, not overlapping). Then
:meth:`SnapshotFile.load` reads the tables asked for, checking that every weight and
momentum value is finite. Any failure raises :class:`SnapshotError` naming the file and
the problem; nothing partial is ever returned. The layout is in :mod:`paramserver.snapshot`.

>>> with open_snapshot("snap.safetensors") as snap:         # doctest: +SKIP
...     tables = snap.load(["classifier"])
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, BinaryIO

import numpy as np

from .optim import SGDConfig
from .snapdir import open_regular
from .table import INITS, MAX_DIM, MAX_STEP, Table, check_name
from .wire import MAX_JSON_DEPTH, json_depth

__all__ = ["SnapshotFile", "open_snapshot", "read_snapshot", "SnapshotError", "FORMAT",
           "FORMAT_VERSION", "MAX_SNAPSHOT_HEADER"]

FORMAT = "hfsoftmax-paramserver-snapshot"
FORMAT_VERSION = "1"
# A header larger than this is not one of ours (ours take ~500 bytes per table).
MAX_SNAPSHOT_HEADER = 16 * 1024 * 1024

_TABLE_KEYS = {"num_rows", "dim", "row_start", "global_rows", "init", "std", "seed", "optim",
               "step"}
_MAX_ROWS = 1 << 62
_MAX_SHARDS = 1 << 20
_CHUNK_BYTES = 64 << 20  # read (and check) tensors in pieces of this size


class SnapshotError(ValueError):
    """A snapshot file that is missing, truncated, or not in the documented format."""


def _reject_constant(name: str):
    raise SnapshotError(f"holds {name}, which is not a number JSON allows")


def _json(raw: bytes | str, what: str, label: str) -> Any:
    data = raw.encode() if isinstance(raw, str) else raw
    if json_depth(data) > MAX_JSON_DEPTH:
        raise SnapshotError(f"snapshot {label}: {what} nests deeper than {MAX_JSON_DEPTH}")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except SnapshotError as exc:
        raise SnapshotError(f"snapshot {label}: {what} {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotError(f"snapshot {label}: {what} is not JSON ({str(exc)[:120]})") from None


def _int(value: Any, lo: int, hi: int, what: str, label: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        text = repr(value)
        raise SnapshotError(f"snapshot {label}: {what} must be an integer in [{lo}, {hi}], got "
                            f"{text[:40] + '...' if len(text) > 40 else text}")
    return value


class SnapshotFile:
    """An open snapshot whose header has been checked in full; :meth:`load` reads tables.

    ``tables``: ``{name: table settings}`` as the file holds them (``step``, ``num_rows``,
    ...); ``shard_index`` / ``shard_count``: the file's place among a sharded server's."""

    def __init__(self, f: BinaryIO, label: str):
        self.f, self.label = f, label
        self.size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise SnapshotError(f"snapshot {label} is truncated ({self.size} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_SNAPSHOT_HEADER or 8 + hlen > self.size:
            raise SnapshotError(f"snapshot {label}: header length {hlen} does not fit the file "
                                f"({self.size} bytes) or exceeds {MAX_SNAPSHOT_HEADER}")
        self.data_start = 8 + hlen
        header = _json(f.read(hlen), "header", label)
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SnapshotError(f"{label} is not a {FORMAT} file")
        if meta.get("version") != FORMAT_VERSION:
            raise SnapshotError(f"snapshot {label} has format version "
                                f"{str(meta.get('version'))[:20]!r}; this server reads "
                                f"{FORMAT_VERSION!r}")
        if not all(isinstance(v, str) for v in meta.values()):
            raise SnapshotError(f"snapshot {label}: __metadata__ values must be strings")
        self.meta = meta
        self.shard_count = self._meta_int("shard_count", 1, 1, _MAX_SHARDS)
        self.shard_index = self._meta_int("shard_index", 0, 0, self.shard_count - 1)
        table_meta = _json(meta.get("tables", "{}"), "table list", label)
        if not isinstance(table_meta, dict):
            raise SnapshotError(f"snapshot {label}: the table list must be a JSON object")
        self.tables = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, tm in table_meta.items():
            self.tables[self._check_name(name)] = self._check_table(name, tm)
            for field in ("weight", "momentum"):
                key = f"{name}/{field}"
                self.offsets[key] = self._check_tensor(key, header.get(key), tm)
        extra = set(header) - set(self.offsets) - {"__metadata__"}
        if extra:
            shown = sorted(extra)[:3]
            raise SnapshotError(f"snapshot {label}: entries {[k[:40] for k in shown]}"
                                f"{' and more' if len(extra) > 3 else ''} belong to no table "
                                "of its table list")
        spans = sorted((a, b, k) for k, (a, b) in self.offsets.items() if b > a)
        for (_, end, k1), (start, _, k2) in zip(spans, spans[1:]):
            if start < end:
                raise SnapshotError(f"snapshot {label}: tensors {k1} and {k2} overlap (data "
                                    f"offsets {self.offsets[k1]} and {self.offsets[k2]})")

    def _meta_int(self, key: str, default: int, lo: int, hi: int) -> int:
        text = self.meta.get(key)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit() and len(text) <= 10):
            raise SnapshotError(f"snapshot {self.label}: {key} {text[:20]!r} is not a count")
        return _int(int(text), lo, hi, key, self.label)

    def _check_name(self, name: str) -> str:
        try:
            return check_name(name)
        except ValueError as exc:
            raise SnapshotError(f"snapshot {self.label}: {exc}") from None

    def _check_table(self, name: str, tm: Any) -> dict:
        label, what = self.label, f"table {name!r}"
        if not isinstance(tm, dict) or set(tm) != _TABLE_KEYS:
            got = sorted(tm)[:12] if isinstance(tm, dict) else type(tm).__name__
            raise SnapshotError(f"snapshot {label}: {what} settings must have exactly the keys "
                                f"{sorted(_TABLE_KEYS)}, got {got}")
        num_rows = _int(tm["num_rows"], 0, _MAX_ROWS, f"{what} num_rows", label)
        _int(tm["dim"], 1, MAX_DIM, f"{what} dim", label)
        row_start = _int(tm["row_start"], 0, _MAX_ROWS, f"{what} row_start", label)
        _int(tm["global_rows"], max(1, row_start + num_rows), _MAX_ROWS,
             f"{what} global_rows", label)
        _int(tm["seed"], 0, (1 << 63) - 1, f"{what} seed", label)
        _int(tm["step"], 0, MAX_STEP, f"{what} step", label)
        if tm["init"] not in INITS:
            raise SnapshotError(f"snapshot {label}: {what} init {str(tm['init'])[:20]!r} is not "
                                f"one of {INITS}")
        std = tm["std"]
        if type(std) not in (int, float) or not (math.isfinite(std) and 0 <= std <= 1e6):
            raise SnapshotError(f"snapshot {label}: {what} std must be a number in [0, 1e6], "
                                f"got {str(std)[:20]}")
        try:
            if not isinstance(tm["optim"], dict):
                raise ValueError("optimizer settings must be a JSON object")
            optim = SGDConfig.from_dict(tm["optim"])
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot {label}: {what}: {str(exc)[:200]}") from None
        return {**tm, "optim": optim}

    def _check_tensor(self, key: str, spec: Any, tm: dict) -> tuple[int, int]:
        label = self.label
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise SnapshotError(f"snapshot {label}: tensor {key} is missing or not "
                                "{dtype, shape, data_offsets}")
        shape, offsets = spec["shape"], spec["data_offsets"]
        if spec["dtype"] != "F32" or shape != [tm["num_rows"], tm["dim"]]:
            raise SnapshotError(f"snapshot {label}: tensor {key} must be F32 "
                                f"[{tm['num_rows']}, {tm['dim']}] as its table says, got "
                                f"{str(spec['dtype'])[:10]} {str(shape)[:40]}")
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise SnapshotError(f"snapshot {label}: tensor {key} data_offsets must be [begin, "
                                "end]")
        limit = self.size - self.data_start
        a = _int(offsets[0], 0, limit, f"tensor {key} data offset begin", label)
        b = _int(offsets[1], a, limit, f"tensor {key} data offset end", label)
        if b - a != 4 * tm["num_rows"] * tm["dim"]:
            raise SnapshotError(f"snapshot {label}: tensor {key} has {b - a} bytes of data, "
                                f"its shape needs {4 * tm['num_rows'] * tm['dim']}")
        return a, b

    def nbytes(self, names: list[str]) -> int:
        """Memory the tables ``names`` take once loaded (weights and momentum)."""
        return sum(8 * self.tables[n]["num_rows"] * self.tables[n]["dim"] for n in names)

    def select(self, names: list[str] | None) -> list[str]:
        """``names`` (all tables when None), each checked to be in the file."""
        if names is None:
            return sorted(self.tables)
        missing = [n for n in names if n not in self.tables]
        if missing:
            raise SnapshotError(f"snapshot {self.label} has no table(s) {missing[:5]}; it "
                                f"holds {sorted(self.tables)[:20]}")
        return list(names)

    def _read_tensor(self, key: str, shape: tuple[int, int], first_row: int) -> np.ndarray:
        a, _ = self.offsets[key]
        out = np.empty(shape, dtype="<f4")
        flat = memoryview(out).cast("B") if out.size else memoryview(b"")
        row_bytes = 4 * shape[1]
        step = max(row_bytes, _CHUNK_BYTES // row_bytes * row_bytes)
        self.f.seek(self.data_start + a)
        for lo in range(0, len(flat), step):
            part = flat[lo:lo + step]
            got = 0
            while got < len(part):
                n = self.f.readinto(part[got:])
                if not n:
                    raise SnapshotError(f"snapshot {self.label} is truncated in tensor {key}")
                got += n
            block = out[lo // row_bytes:(lo + len(part)) // row_bytes]
            if not np.isfinite(block).all():
                bad = lo // row_bytes + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise SnapshotError(f"snapshot {self.label}: {key} of row {first_row + bad} is "
                                    "not finite (NaN or inf); the file is damaged")
        return out

    def load(self, names: list[str] | None = None) -> dict[str, Table]:
        """The tables ``names`` (all when None) with their weights, momentum, settings and
        step, every value checked finite."""
        tables = {}
        for name in self.select(names):
            tm = self.tables[name]
            shape = (tm["num_rows"], tm["dim"])
            weight = self._read_tensor(f"{name}/weight", shape, tm["row_start"])
            momentum = self._read_tensor(f"{name}/momentum", shape, tm["row_start"])
            t = Table(name, tm["num_rows"], tm["dim"], init=tm["init"], std=tm["std"],
                      seed=tm["seed"], row_start=tm["row_start"], optim=tm["optim"],
                      weight=weight, momentum=momentum, global_rows=tm["global_rows"])
            t.updates = tm["step"]
            tables[name] = t
        return tables

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "SnapshotFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_snapshot(src: str | os.PathLike | BinaryIO, label: str | None = None) -> SnapshotFile:
    """Open a snapshot (a path, or an open binary file that is then owned) and check its
    header; ``SnapshotError`` naming the problem otherwise. A path must be a regular file
    (a FIFO or device is refused without blocking)."""
    if isinstance(src, (str, os.PathLike)):
        label = label or repr(os.fspath(src))
        try:
            f = open_regular(src, label=label)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {label} not found") from None
        except OSError as exc:
            raise SnapshotError(f"snapshot {label} cannot be read: {exc.strerror}") from None
        except ValueError as exc:  # not a regular file
            raise SnapshotError(str(exc)) from None
    else:
        f, label = src, label or repr(getattr(src, "name", "<file>"))
    try:
        return SnapshotFile(f, label)
    except BaseException:
        f.close()
        raise


def read_snapshot(src: str | os.PathLike | BinaryIO, tables: list[str] | None = None
                  ) -> tuple[dict[str, Table], dict[str, str]]:
    """Load the tables ``tables`` (default: every table) of a snapshot file, all checked
    (:class:`SnapshotFile`); returns ``(tables, metadata)``. Never returns a partial
    result."""
    with open_snapshot(src) as snap:
        return snap.load(tables), snap.meta
