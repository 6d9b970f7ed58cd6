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
be memory-mapped (``np.memmap`` at ``8 + N + a``). Reading checks the whole file before
returning anything (:func:`open_snapshot`): header size and nesting, names, shapes, data
offsets inside the file and not overlapping, settings, step counters, finite values. Writes
are atomic: a temp file in the same
folder, fsync, ``os.replace``, fsync of the folder; a crash mid-write leaves the previous
file intact. Content is deterministic (no timestamps), so equal state gives equal bytes.

The temp file is ``.<name>.<pid>@<host>.<random>.tmp``: it names the writing process, so a
temp file left by a writer that was killed (``kill -9`` mid-write) can be told from one
being written. :func:`remove_stale_temp_files` deletes the former (the server runs it at
start-up on ``--snapshot-dir`` and the ``--restore`` file's folder; every
:func:`write_snapshot` runs it on its folder). Files are written and cleaned relative to an
open folder handle where the caller gives one (the server's confined folder,
:mod:`paramserver.snapdir`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import struct
from pathlib import Path

import numpy as np

from .fileio import atomic_write
from .snapcheck import (FORMAT, FORMAT_VERSION, MAX_SNAPSHOT_HEADER, SnapshotError,
                        SnapshotFile, open_snapshot, read_snapshot)
from .table import Table

__all__ = ["FORMAT", "FORMAT_VERSION", "write_snapshot", "read_snapshot", "open_snapshot",
           "SnapshotError", "SnapshotFile", "remove_stale_temp_files", "temp_prefix",
           "MAX_SNAPSHOT_HEADER"]

log = logging.getLogger(__name__)

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


# ".<name>.<pid>@<host>.<random>.tmp"; <random> is letters, digits and "_".
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]{1,10})@(?P<host>[A-Za-z0-9-]{1,64})"
                        r"\.[A-Za-z0-9_]+\.tmp$")


def _host_tag() -> str:
    """This machine's name as it appears in temp file names (letters, digits and "-")."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "localhost"


def temp_prefix(name: str) -> str:
    """The prefix of the temp file a snapshot to ``name`` is written to from this process:
    ``.<name>.<pid>@<host>.`` (a random ``<random>.tmp`` follows)."""
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


def remove_stale_temp_files(folder: str | os.PathLike, *, own_pid_is_stale: bool = False,
                            dir_fd: int | None = None) -> list[Path]:
    """Delete the snapshot temp files in ``folder`` whose writer is gone; return their paths.

    A temp file ``.<name>.<pid>@<host>.<random>.tmp`` (see :func:`temp_prefix`) is stale
    when ``<host>`` is this machine and no process ``<pid>`` runs here: its writer was
    killed mid-write. Kept: files of a live pid (a write in progress, or a reused pid),
    of another host (a folder shared between machines: their pids mean nothing here), and
    every file not named like that. ``own_pid_is_stale``: count this process's own pid as
    gone, for a caller that knows it is writing no snapshot (a server starting up: a file
    with its pid is from an earlier process that had the same pid, e.g. pid 1 in a
    restarted container). ``dir_fd``: an open handle on ``folder`` to work in (``folder``
    then only names it in the log). Each removal is logged at WARNING; errors are logged,
    never raised (a missing or unreadable folder removes nothing).
    """
    folder = Path(folder)
    try:
        names = os.listdir(dir_fd if dir_fd is not None else folder)
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
        target = name if dir_fd is not None else folder / name
        try:
            size = os.stat(target, dir_fd=dir_fd, follow_symlinks=False).st_size
            os.unlink(target, dir_fd=dir_fd)
        except FileNotFoundError:  # another process cleaned it up first
            continue
        except OSError as exc:
            log.warning("cannot remove stale snapshot temp file %s: %s", folder / name, exc)
            continue
        removed.append(folder / name)
        log.warning("removed stale snapshot temp file %s (%d bytes): its writer, pid %d on "
                    "this host, is gone (killed mid-write; %s was left as it was)",
                    folder / name, size, pid, folder / m.group("name"))
    return removed


def _table_meta(t: Table) -> dict:
    return {"num_rows": t.num_rows, "dim": t.dim, "row_start": t.row_start,
            "global_rows": t.global_rows,
            "init": t.init, "std": t.std, "seed": t.seed, "optim": t.optim.to_dict(),
            "step": t.updates}


def write_snapshot(path: str | os.PathLike, tables: dict[str, Table],
                   extra_meta: dict[str, str] | None = None, *,
                   dir_fd: int | None = None, folder_label: str | os.PathLike = ".") -> int:
    """Atomically write ``tables`` to ``path``; returns the file size in bytes.

    ``dir_fd``: an open handle on the target folder, ``path`` then being a file name in it
    (how the server writes inside its confined folder; ``folder_label`` names that folder in
    log lines). First removes the temp files that killed writers left in the folder
    (:func:`remove_stale_temp_files`)."""
    if dir_fd is None:
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        try:
            fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise SnapshotError(f"snapshot folder {str(folder)!r} does not exist; create it "
                                "first") from None
        try:
            return write_snapshot(path.name, tables, extra_meta, dir_fd=fd,
                                  folder_label=folder)
        finally:
            os.close(fd)
    name = os.fspath(path)
    remove_stale_temp_files(folder_label, dir_fd=dir_fd)
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
    with atomic_write(name, "wb", dir_fd=dir_fd, temp_prefix=temp_prefix(name)) as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for arr in arrays:
            f.write(memoryview(arr).cast("B"))
    return 8 + len(hbytes) + offset

