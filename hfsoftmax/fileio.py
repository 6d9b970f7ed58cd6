"""Atomic file writes: the one place ``hfsoftmax`` writes a file so that a crash at any moment
leaves either the previous file or the complete new one, never a half-written file.

(``paramserver`` and ``evaluation`` are kept free of ``hfsoftmax`` imports and have their
own copies of this for their snapshot and report files.)

>>> with atomic_write("out.txt", "w") as f:   # doctest: +SKIP
...     f.write("done\\n")
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_write", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *,
                 encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file beside ``path``; on a clean exit fsync it, make it world-readable
    (0644, as a plain ``open`` would under the usual umask) and rename it onto ``path``.
    On an exception the temp file is removed and ``path`` is left as it was."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj, *, indent: int | None = None,
               sort_keys: bool = False) -> str:
    """Write ``obj`` as JSON (one trailing newline) to ``path`` atomically; return the JSON
    text (without the newline), for a caller that also prints it."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys)
    write_text(path, text + "\n")
    return text
