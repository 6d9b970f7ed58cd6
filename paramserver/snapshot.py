"""Snapshot files: the safetensors layout, written and read with numpy alone.

One file per server (shard)::

    8 bytes   little-endian uint64 N: length of the JSON header
    N bytes   JSON header, padded with spaces to a multiple of 8 bytes:
              {"__metadata__": {"format": "hfsoftmax-paramserver-snapshot", "version": "1",
                                "tables": "<JSON string, see below>", ...},
               "<table>/weight":   {"dtype": "F32", "shape": [rows, dim], "data_offsets": [a, b]},
               "<table>/momentum": {"dtype": "F32", "shape": [rows, dim], "data_offsets": [c, d]}}
    data      raw little-endian float32 tensors, C order, back to back (offsets are relative
              to the first byte after the header)

So the file is readable by the ``safetensors`` library (``safe_open(path, "numpy")``) and can
be memory-mapped (``np.memmap`` at ``8 + N + a``). Writes are atomic: a temp file in the same
folder, fsync, ``os.replace``, fsync of the folder; a crash mid-write leaves the previous
file intact. Content is deterministic (no timestamps), so equal state gives equal bytes.

The temp file is ``.<name>.<pid>@<host>.<random>.tmp``: it names the writing process, so a
temp file left by a writer that was killed (``kill -9`` mid-write) can be told from one
being written. :func:`remove_stale_temp_files` deletes the former (the server runs it at
start-up on ``--snapshot-dir`` and the ``--restore`` file's folder; every
:func:`write_snapshot` runs it on its folder).
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import tempfile
from pathlib import Path

import numpy as np

from .optim import SGDConfig
from .table import Table

__all__ = ["FORMAT", "FORMAT_VERSION", "write_snapshot", "read_snapshot", "SnapshotError",
           "remove_stale_temp_files", "temp_prefix"]

log = logging.getLogger(__name__)

FORMAT = "hfsoftmax-paramserver-snapshot"
FORMAT_VERSION = "1"
# A header larger than this is not one of ours (the safetensors library uses 100 MB too).
_MAX_HEADER = 100 * 1024 * 1024


class SnapshotError(ValueError):
    """A snapshot file that is missing, truncated, or not in the documented format."""


# ".<name>.<pid>@<host>.<random>.tmp"; <random> is mkstemp's (letters, digits, "_").
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]{1,10})@(?P<host>[A-Za-z0-9-]{1,64})"
                        r"\.[A-Za-z0-9_]+\.tmp$")


def _host_tag() -> str:
    """This machine's name as it appears in temp file names (letters, digits and "-")."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "localhost"


def temp_prefix(name: str) -> str:
    """The prefix of the temp file a snapshot to ``name`` is written to from this process:
    ``.<name>.<pid>@<host>.`` (``mkstemp`` appends ``<random>.tmp``)."""
    return f".{name}.{os.getpid()}@{_host_tag()}."


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (another user's counts).
    True when that cannot be told (Windows, where signal 0 would terminate the process)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: exists; a pid out of range: unsure
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, *,
                            own_pid_is_stale: bool = False) -> list[Path]:
    """Delete the snapshot temp files in ``folder`` whose writer is gone; return their paths.

    A temp file ``.<name>.<pid>@<host>.<random>.tmp`` (see :func:`temp_prefix`) is stale
    when ``<host>`` is this machine and no process ``<pid>`` runs here: its writer was
    killed mid-write. Kept: files of a live pid (a write in progress, or a reused pid),
    of another host (a folder shared between machines: their pids mean nothing here), and
    every file not named like that. ``own_pid_is_stale``: count this process's own pid as
    gone, for a caller that knows it is writing no snapshot (a server starting up: a file
    with its pid is from an earlier process that had the same pid, e.g. pid 1 in a
    restarted container). Each removal is logged at WARNING; errors are logged, never
    raised (a missing or unreadable folder removes nothing).
    """
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    host = _host_tag()
    removed = []
    for name in sorted(names):
        m = _TEMP_NAME.match(name)
        if m is None or m.group("host") != host:
            continue
        pid = int(m.group("pid"))
        if pid <= 0:
            continue
        if pid == os.getpid():
            if not own_pid_is_stale:
                continue
        elif _pid_alive(pid):
            continue
        path = folder / name
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another process cleaned it up first
            continue
        except OSError as exc:
            log.warning("cannot remove stale snapshot temp file %s: %s", path, exc)
            continue
        removed.append(path)
        log.warning("removed stale snapshot temp file %s (%d bytes): its writer, pid %d on "
                    "this host, is gone (killed mid-write; %s was left as it was)", path,
                    size, pid, folder / m.group("name"))
    return removed


def _table_meta(t: Table) -> dict:
    return {"num_rows": t.num_rows, "dim": t.dim, "row_start": t.row_start,
            "global_rows": t.global_rows,
            "init": t.init, "std": t.std, "seed": t.seed, "optim": t.optim.to_dict(),
            "step": t.updates}


def write_snapshot(path: str | os.PathLike, tables: dict[str, Table],
                   extra_meta: dict[str, str] | None = None) -> int:
    """Atomically write ``tables`` to ``path``; returns the file size in bytes.

    First removes the temp files that killed writers left in the folder
    (:func:`remove_stale_temp_files`)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise SnapshotError(f"snapshot folder {str(folder)!r} does not exist; create it first")
    remove_stale_temp_files(folder)
    names = sorted(tables)
    for n in names:  # the file holds values: write any weight decay still owed into them
        tables[n].settle()
    meta = {"format": FORMAT, "version": FORMAT_VERSION,
            "tables": json.dumps({n: _table_meta(tables[n]) for n in names}, sort_keys=True)}
    for k, v in (extra_meta or {}).items():
        meta[str(k)] = str(v)
    header: dict = {"__metadata__": meta}
    offset = 0
    arrays = []
    for n in names:
        t = tables[n]
        for field in ("weight", "momentum"):
            arr = np.ascontiguousarray(getattr(t, field), dtype="<f4")
            header[f"{n}/{field}"] = {"dtype": "F32", "shape": list(arr.shape),
                                      "data_offsets": [offset, offset + arr.nbytes]}
            offset += arr.nbytes
            arrays.append(arr)
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for arr in arrays:
                f.write(memoryview(arr).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the rows from the group's eval jobs
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return 8 + len(hbytes) + offset


def read_snapshot(path: str | os.PathLike) -> tuple[dict[str, Table], dict[str, str]]:
    """Load every table of a snapshot file (weights and momentum copied into memory).

    Raises ``SnapshotError`` naming what is wrong; never returns a partial result.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SnapshotError(f"snapshot {str(path)!r} is truncated ({size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise SnapshotError(f"snapshot {str(path)!r}: header length {hlen} does not "
                                    f"fit the file ({size} bytes)")
            header = json.loads(f.read(hlen).decode("utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {str(path)!r} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"snapshot {str(path)!r}: header is not JSON ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SnapshotError(f"{str(path)!r} is not a {FORMAT} file")
    if meta.get("version") != FORMAT_VERSION:
        raise SnapshotError(f"snapshot {str(path)!r} has format version "
                            f"{meta.get('version')!r}; this server reads {FORMAT_VERSION!r}")
    data_start = 8 + hlen
    try:
        table_meta = json.loads(meta["tables"])
        tables = {}
        for name, tm in table_meta.items():
            arrays = {}
            for field in ("weight", "momentum"):
                spec = header[f"{name}/{field}"]
                shape = tuple(spec["shape"])
                a, b = spec["data_offsets"]
                if (spec["dtype"] != "F32" or shape != (tm["num_rows"], tm["dim"])
                        or b - a != 4 * tm["num_rows"] * tm["dim"] or data_start + b > size):
                    raise SnapshotError(f"snapshot {str(path)!r}: tensor {name}/{field} "
                                        f"{spec} does not match table metadata {tm} or the "
                                        f"file size {size}")
                mm = np.memmap(path, dtype="<f4", mode="r", offset=data_start + a,
                               shape=shape) if b > a else np.zeros(shape, "<f4")
                arrays[field] = np.array(mm, dtype=np.float32)  # writable copy
                del mm
            t = Table(name, tm["num_rows"], tm["dim"], init=tm["init"], std=tm["std"],
                      seed=tm["seed"], row_start=tm["row_start"],
                      optim=SGDConfig.from_dict(tm["optim"]), weight=arrays["weight"],
                      momentum=arrays["momentum"], global_rows=int(tm["global_rows"]))
            t.updates = int(tm["step"])
            tables[name] = t
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot {str(path)!r}: bad table metadata ({exc!r})") from None
    return tables, meta
