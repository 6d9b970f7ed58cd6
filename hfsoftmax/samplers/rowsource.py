"""Where an index process reads the rows of a rebuild: row-source specs, both sides.

A rebuild in an index process is told where the rows are, as a JSON dict, instead of being
sent them: ``{"kind": "paramserver", ...}`` (a :class:`~hfsoftmax.rowstore.ParamRowSource`:
the child reads the table with a ``ParamClient`` of its own) or ``{"kind": "npy", "path",
"delete"}`` (:class:`NpyRowSource`: a ``.npy`` file, which :func:`stage_rows` writes from
rows the trainer holds anyway). :func:`source_dict` checks a spec on the trainer's side,
:func:`read_rows` reads it on the child's. Torch-free.

>>> spec = source_dict(rowstore.row_source())          # the trainer
>>> rows = read_rows(spec)                             # the index process, on its rebuild thread
"""
from __future__ import annotations

import io
import json
import os
import stat
import tempfile
from typing import Any

import numpy as np

__all__ = ["NpyRowSource", "read_rows", "source_dict", "stage_rows"]

KINDS = ("paramserver", "npy")


class NpyRowSource:
    """Rows in a ``.npy`` file that the index process loads (``delete``: then removes it).

    A FIFO path works too (the child reads it to the end before parsing), which the tests use
    to hold a rebuild open deterministically.
    """

    kind = "npy"

    def __init__(self, path: str | os.PathLike, delete: bool = False):
        self.path, self.delete = os.fspath(path), bool(delete)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "delete": self.delete}


def source_dict(spec: Any) -> dict:
    """A row-source spec (object with ``to_dict`` or a dict) as a validated JSON-able dict."""
    d = spec.to_dict() if hasattr(spec, "to_dict") else spec
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
        raise ValueError(f"a row source must be a ParamRowSource, an NpyRowSource or their "
                         f"dict (kind 'paramserver' or 'npy'), got {spec!r}")
    json.dumps(d)  # must cross the pipe as JSON
    return d


def stage_rows(rows, shape: tuple[int, int], tmp_dir: str | None = None) -> dict:
    """Write ``rows`` (an array, or a callable returning one) of ``shape`` to a temporary
    ``.npy`` file; returns the spec that makes the reader delete it."""
    raw = np.asarray(rows() if callable(rows) else rows)
    if raw.shape != tuple(shape):
        raise ValueError(f"rows must have shape (num_classes, dim) = {tuple(shape)}, got "
                         f"{tuple(raw.shape)}")
    fd, path = tempfile.mkstemp(prefix="hfsoftmax-rows-", suffix=".npy", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(raw, dtype=np.float32), allow_pickle=False)
    except BaseException:
        os.unlink(path)
        raise
    return NpyRowSource(path, delete=True).to_dict()


def read_rows(source: dict) -> np.ndarray:
    """All rows of a row-source dict: a parameter server's table through a new client of
    its own, or a ``.npy`` file (or FIFO; ``delete``: then removed)."""
    if source["kind"] == "paramserver":
        from ..rowstore import ParamRowSource
        return ParamRowSource.from_dict(source).read()
    path = source["path"]
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):  # read to the end before parsing
            with open(path, "rb") as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
        return np.load(path, allow_pickle=False)
    finally:
        if source.get("delete"):
            try:
                os.unlink(path)
            except OSError:
                pass
