"""Snapshots across shard counts: read a table from a snapshot written by any number of
shards, and write it again for any other number.

A snapshot of a server of S shards is S files, ``<path>.00000-of-0000S`` ...
(:func:`shard_file_names`; one shard: ``<path>`` itself), shard ``i`` holding the rows
``[i * N // S, (i + 1) * N // S)`` of each N-row table, as :class:`ParamClient` splits them.
:func:`load_tables` finds and checks the whole set (every shard present and of the same
count, the tables' row ranges tiling ``[0, N)``, the same settings and the same step on
every shard) and joins each table's rows and momentum. :func:`reshard` writes them back as
the files of ``count`` shards, so a run can continue on another number of servers:

    python -m paramserver.reshard <snapshot folder>/classifier/rows_step000001000.safetensors \\
        --shards 3

writes ``rows_step000001000.safetensors.0000{0,1,2}-of-00003`` beside the old files; each new
server restores its file as before (``ParamClient.restore``, the trainer's ``--resume`` with
three ``--ps`` addresses). Run it where the snapshot folder is (with separate folders, copy
every old shard's file into one first, and each new file to its server's folder after).
The whole table (rows and momentum) is held in memory once. Torch-free (numpy only).

>>> tables = load_tables("snaps/rows_step100")            # {name: Table of all rows}
>>> reshard("snaps/rows_step100", 3)                      # -> three shard files
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Sequence

import numpy as np

from .snapcheck import SnapshotError, open_snapshot
from .snapshot import write_snapshot
from .table import Table, shard_bounds

__all__ = ["shard_file_names", "find_snapshot_files", "load_tables", "reshard", "main"]

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"\.(\d{5})-of-(\d{5})$")
MAX_SHARDS = 99999


def shard_file_names(path: str | os.PathLike, count: int) -> list[str]:
    """The files of a snapshot ``path`` written by ``count`` shards."""
    path = os.fspath(path)
    if not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"shard count must be 1..{MAX_SHARDS}, got {count}")
    return [path] if count == 1 else [f"{path}.{i:05d}-of-{count:05d}" for i in range(count)]


def find_snapshot_files(path: str | os.PathLike, count: int | None = None) -> list[str]:
    """The files of snapshot ``path``: ``path`` itself when it is a file, else its shard
    files ``path.IIIII-of-SSSSS``: the set of ``count`` shards, or the only set there is.
    Raises ``SnapshotError`` naming what is there."""
    path = os.fspath(path)
    if count == 1 or (count is None and os.path.isfile(path)):
        if not os.path.isfile(path):
            raise SnapshotError(f"snapshot {path!r} not found")
        return [path]
    folder, base = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError as e:
        raise SnapshotError(f"snapshot {path!r}: cannot list its folder ({e.strerror})") \
            from None
    counts: dict[int, set[int]] = {}
    for n in names:
        m = _SUFFIX.search(n)
        if m and n[:m.start()] == base:
            counts.setdefault(int(m[2]), set()).add(int(m[1]))
    if not counts:
        raise SnapshotError(f"snapshot {path!r} not found (neither the file nor shard files "
                            f"{os.path.basename(path)}.00000-of-NNNNN beside it)")
    if count is not None:
        if count not in counts:
            raise SnapshotError(f"snapshot {path!r}: no shard files of {count} shards beside "
                                f"it (there are sets of {sorted(counts)})")
        counts = {count: counts[count]}
    if len(counts) > 1:
        raise SnapshotError(f"snapshot {path!r}: shard files of several shard counts "
                            f"{sorted(counts)} are beside it; say which set to read "
                            "(python -m paramserver.reshard --from-shards), or remove the "
                            "set you do not need")
    (count, have), = counts.items()
    missing = sorted(set(range(count)) - have)
    if missing:
        raise SnapshotError(f"snapshot {path!r}: shard file(s) {missing[:5]} of {count} are "
                            "missing")
    return shard_file_names(path, count)


def load_tables(path: str | os.PathLike, tables: Sequence[str] | None = None,
                count: int | None = None) -> dict[str, Table]:
    """Every table (or ``tables``) of snapshot ``path`` (one file or a set of shard files;
    ``count``: the set of that many shards) with all its rows, momentum, settings and step,
    checked as the module docstring says."""
    files = find_snapshot_files(path, count)
    parts: dict[str, list[Table]] = {}
    names = None
    for i, f in enumerate(files):
        with open_snapshot(f) as snap:
            if (snap.shard_index, snap.shard_count) != (i, len(files)):
                raise SnapshotError(f"{f!r} says it is shard {snap.shard_index} of "
                                    f"{snap.shard_count}, its name says {i} of {len(files)}")
            chosen = snap.select(list(tables) if tables is not None else None)
            if names is None:
                names = chosen
            elif sorted(chosen) != sorted(names):
                raise SnapshotError(f"{f!r} holds tables {sorted(snap.tables)}, shard 0 "
                                    f"holds {sorted(names)}")
            for name, t in snap.load(chosen).items():
                parts.setdefault(name, []).append(t)
    return {name: _join(name, ts, files) for name, ts in parts.items()}


def _join(name: str, parts: list[Table], files: list[str]) -> Table:
    first = parts[0]
    start = 0
    for t, f in zip(parts, files):
        same = (t.dim, t.global_rows, t.init, t.std, t.seed, t.optim.to_dict(), t.updates) == \
            (first.dim, first.global_rows, first.init, first.std, first.seed,
             first.optim.to_dict(), first.updates)
        if not same:
            raise SnapshotError(f"table {name!r}: {f!r} differs from {files[0]!r} in its "
                                f"settings or step ({t.updates} vs {first.updates}): the "
                                "shards were not snapshotted together")
        if t.row_start != start:
            raise SnapshotError(f"table {name!r}: {f!r} holds rows from {t.row_start}, "
                                f"expected {start}: the shards do not tile the table")
        start += t.num_rows
    if start != first.global_rows:
        raise SnapshotError(f"table {name!r}: the shards hold {start} of its "
                            f"{first.global_rows} rows")
    weight = parts[0].weight if len(parts) == 1 else np.concatenate([t.weight for t in parts])
    momentum = parts[0].momentum if len(parts) == 1 else \
        np.concatenate([t.momentum for t in parts])
    out = Table(name, start, first.dim, init=first.init, std=first.std, seed=first.seed,
                optim=first.optim, weight=weight, momentum=momentum, global_rows=start)
    out.updates = first.updates
    return out


def reshard(path: str | os.PathLike, count: int, out: str | os.PathLike | None = None,
            tables: Sequence[str] | None = None, from_count: int | None = None) -> list[str]:
    """Write the tables of snapshot ``path`` (its set of ``from_count`` shards, or its only
    set) as the files of ``count`` shards named after ``out`` (default ``path``); returns
    the files written. Existing files of that name are replaced atomically; the source
    files are left as they are."""
    full = load_tables(path, tables, from_count)
    files = shard_file_names(out if out is not None else path, count)
    source = set(map(os.path.abspath, find_snapshot_files(path, from_count)))
    if source & set(map(os.path.abspath, files)):
        raise ValueError(f"the snapshot is already in {count} shard(s) under that name; give "
                         "another shard count or --out")
    for i, f in enumerate(files):
        shard = {}
        for name, t in full.items():
            a, b = shard_bounds(t.num_rows, count)[i]
            s = Table(name, b - a, t.dim, init=t.init, std=t.std, seed=t.seed, row_start=a,
                      optim=t.optim, weight=np.ascontiguousarray(t.weight[a:b]),
                      momentum=np.ascontiguousarray(t.momentum[a:b]), global_rows=t.num_rows)
            s.updates = t.updates
            shard[name] = s
        write_snapshot(f, shard, {"shard_index": str(i), "shard_count": str(count)})
    log.info("resharded %s (%d table(s)) into %d shard(s): %s", path, len(full), count,
             ", ".join(files))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paramserver.reshard",
                                description="Rewrite a parameter-server snapshot (one file or "
                                            "its shard files) for another number of shards.")
    p.add_argument("snapshot", help="the snapshot path (without a .IIIII-of-SSSSS suffix)")
    p.add_argument("--shards", type=int, required=True, help="the new number of shards")
    p.add_argument("--out", default=None, help="the new snapshot path (default: the same)")
    p.add_argument("--tables", nargs="+", default=None, help="only these tables")
    p.add_argument("--from-shards", type=int, default=None,
                   help="read the set of this many shards (where sets of several counts are "
                        "beside the snapshot)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        files = reshard(args.snapshot, args.shards, args.out, args.tables, args.from_shards)
    except (SnapshotError, ValueError, OSError) as e:
        print(f"reshard: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
