"""Atomic file writes, the one implementation for ``paramserver`` and ``hfsoftmax`` (which
re-exports it from :mod:`hfsoftmax.fileio`); torch-free. ``evaluation`` keeps its own copy,
as it imports neither package.

A crash at any moment leaves either the previous file or the complete new one under the
final name, never a half-written one: the bytes go to a fresh temp file beside the target
(created exclusively, never through a symbolic link), are flushed and fsynced, made
world-readable (0644, as a plain ``open`` would under the usual umask) and renamed onto the
target; the folder is fsynced too, so the rename itself survives a power loss.

>>> with atomic_write("out.bin") as f:            # doctest: +SKIP
...     f.write(b"done")
>>> with atomic_write("rows.safetensors", dir_fd=folder_fd) as f:   # inside an open folder
...     f.write(payload)
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Iterator

__all__ = ["atomic_write"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
    getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, dir_fd: int | None = None,
                 encoding: str | None = None, fsync: bool = True,
                 temp_prefix: str | None = None) -> Iterator[IO]:
    """Open a temp file beside ``path``; on a clean exit make it the file at ``path``; on an
    exception remove it and leave ``path`` as it was.

    ``dir_fd``: ``path`` is a plain name inside that open folder (the parameter server's
    confined snapshot folder); else its folder is created if missing. ``fsync=False`` skips
    the fsyncs (many small files where a process crash, not a power loss, is the risk: a
    partial file still never appears under the final name). ``temp_prefix``: the temp
    file's name up to its random part (default ``.<name>.``; the snapshot writer puts its pid
    and host there, so that a killed writer's leftovers can be told apart and removed).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    if dir_fd is None:
        folder = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(folder, exist_ok=True)
        name = temp_prefix or f".{os.path.basename(path)}."
        tmp = os.path.join(folder, f"{name}{secrets.token_hex(6)}.tmp")
    else:
        if os.sep in path:
            raise ValueError(f"atomic_write with dir_fd takes a plain file name, got {path!r}")
        tmp = f"{temp_prefix or f'.{path}.'}{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, _FLAGS, 0o644, dir_fd=dir_fd)
    try:
        with (os.fdopen(fd, "w", encoding=encoding or "utf-8") if mode == "w"
              else os.fdopen(fd, "wb")) as f:
            os.fchmod(f.fileno(), 0o644)  # whatever the umask
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if fsync:
        _fsync_folder(dir_fd, path)


def _fsync_folder(dir_fd: int | None, path: str) -> None:
    """fsync the folder holding ``path`` (the rename's entry), where the system allows it."""
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
