"""Export one table of a parameter-server snapshot as a single matrix of all its rows.

    python -m paramserver.export <snapshot> --out rows.npy            # float32 (N, D)
    python -m paramserver.export <snapshot> --out rows.safetensors --table classifier

``<snapshot>`` is a snapshot path as the trainer's checkpoint names it (one file, or the
shard files ``<snapshot>.IIIII-of-SSSSS`` of a sharded server: they are joined,
:mod:`paramserver.reshard`). The output holds the table's rows in class order, float32:

- ``.npy``: the ``(N, D)`` array alone (``np.load(path, allow_pickle=False)``);
- ``.safetensors``: tensor ``weight`` ``(N, D)`` (and ``momentum`` with ``--momentum``),
  metadata ``table``, ``step`` and ``source``; readable by the ``safetensors`` library.

So a classifier can be handed to another tool, or to a new run: the trainer's
``--init-rows FILE`` loads either file into its rows bit for bit. Written atomically (temp
file, fsync, rename). Torch-free (numpy only).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from typing import Sequence

import numpy as np

from .fileio import atomic_write
from .reshard import load_tables
from .snapcheck import SnapshotError

__all__ = ["export_rows", "write_safetensors", "main"]


def _atomic(path: str, write) -> None:
    with atomic_write(path) as f:
        write(f)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """``tensors`` (float32, C order) in the safetensors layout, atomically."""
    header: dict = {"__metadata__": {k: str(v) for k, v in meta.items()}}
    offset, arrays = 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a).cast("B"))

    _atomic(path, write)


def export_rows(snapshot: str | os.PathLike, out: str | os.PathLike, table: str = "classifier",
                momentum: bool = False) -> tuple[int, int]:
    """Write table ``table`` of ``snapshot`` to ``out`` (``.npy`` or ``.safetensors``);
    returns its ``(rows, dim)``."""
    out = os.fspath(out)
    kind = os.path.splitext(out)[1].lower()
    if kind not in (".npy", ".safetensors"):
        raise ValueError(f"--out {out}: the name must end in .npy or .safetensors")
    if momentum and kind == ".npy":
        raise ValueError("--momentum needs a .safetensors output (a .npy holds one array)")
    t = load_tables(snapshot, [table])[table]
    if kind == ".npy":
        _atomic(out, lambda f: np.save(f, t.weight, allow_pickle=False))
    else:
        tensors = {"weight": t.weight, **({"momentum": t.momentum} if momentum else {})}
        write_safetensors(out, tensors, {"format": "hfsoftmax-rows", "table": table,
                                         "step": t.updates, "source": os.fspath(snapshot)})
    return t.num_rows, t.dim


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paramserver.export",
                                description="Write all rows of a snapshot's table as one "
                                            ".npy or .safetensors matrix.")
    p.add_argument("snapshot", help="snapshot path (one file, or the base of shard files)")
    p.add_argument("--out", required=True, help="output file: *.npy or *.safetensors")
    p.add_argument("--table", default="classifier", help="table name (default classifier)")
    p.add_argument("--momentum", action="store_true",
                   help="also write the momentum buffers (.safetensors only)")
    args = p.parse_args(argv)
    try:
        rows, dim = export_rows(args.snapshot, args.out, args.table, args.momentum)
    except (SnapshotError, ValueError, OSError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"{rows} x {dim} rows of {args.table!r} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
