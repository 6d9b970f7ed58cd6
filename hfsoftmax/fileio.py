"""Atomic file writes for ``hfsoftmax``: :func:`atomic_write` is ``paramserver``'s (one
implementation for both packages; ``evaluation``, which imports neither, keeps its own),
plus the text and JSON writers built on it. A crash at any moment leaves either the previous
file or the complete new one, never a half-written file.

>>> with atomic_write("out.txt", "w") as f:   # doctest: +SKIP
...     f.write("done\\n")
"""
from __future__ import annotations

import json
import os

from paramserver.fileio import atomic_write

__all__ = ["atomic_write", "write_json", "write_text"]


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
