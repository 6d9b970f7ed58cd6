"""The one folder the parameter server reads and writes: its snapshot folder.

Clients name snapshot files by paths *relative* to the folder (``run1/rows_step100``;
sub-folders are created as needed). A path that is absolute, holds ``..``, passes through
a symbolic link, or names anything but a regular file (a FIFO, a device, a folder) is
refused. Every component is opened relative to the folder's handle with ``O_NOFOLLOW``
(``openat``), so a link created while the server works cannot lead out either; files are
opened non-blocking and checked with ``fstat``, so a FIFO cannot block the server's single
thread. This module is the only place the server touches the file system on a client's
behalf (``snapshot``, ``restore``, ``delete_snapshot``).

>>> folder = SnapshotDir("paramserver-snapshots")       # doctest: +SKIP
>>> with folder.open_read("run1/rows_step100") as f:     # doctest: +SKIP
...     ...
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

__all__ = ["SnapshotDir", "SnapshotPathError", "open_regular", "DEFAULT_SNAPSHOT_DIR"]

# Relative to the server's working directory; created at start-up.
DEFAULT_SNAPSHOT_DIR = "paramserver-snapshots"
_MAX_PATH = 1024
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
T = TypeVar("T")


class SnapshotPathError(ValueError):
    """A snapshot path the server refuses: outside its folder, or not a regular file."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, *, dir_fd: int | None = None,
                 follow: bool = True, label: str | None = None) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file, else raise ``SnapshotPathError``
    (``FileNotFoundError`` when it does not exist).

    The type is checked before opening (so a device is never opened) and again on the open
    handle (so a swap in between is caught); the open is non-blocking, so a FIFO returns at
    once instead of waiting for a writer. ``follow=False``: a symbolic link is refused.
    """
    label = label or repr(os.fspath(path))
    st = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow)
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotPathError(f"snapshot {label} is {_kind(st.st_mode)}, not a regular file")
    flags = os.O_RDONLY | _NONBLOCK | _CLOEXEC | _NOCTTY | (0 if follow else _NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SnapshotPathError(f"snapshot {label} is a symbolic link; links are not "
                                    "followed") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotPathError(f"snapshot {label} is {_kind(st.st_mode)}, not a "
                                    "regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def split_relative(path: object) -> list[str]:
    """The components of a client's snapshot path, or ``SnapshotPathError`` saying why it
    is refused: not a string, empty, absolute, with ``..``, too long, or with a NUL byte.
    Empty and ``.`` components are dropped (``a//./b`` is ``a/b``)."""
    if not isinstance(path, str):
        raise SnapshotPathError(f"snapshot path must be a string, got {type(path).__name__}")
    shown = repr(path if len(path) <= 80 else path[:80] + "...")
    if len(path.encode("utf-8", "surrogatepass")) > _MAX_PATH or "\0" in path:
        raise SnapshotPathError(f"snapshot path {shown} is longer than {_MAX_PATH} bytes or "
                                "holds a NUL byte")
    if path.startswith(("/", "\\")) or os.path.isabs(path):
        raise SnapshotPathError(f"snapshot path {shown} is absolute; give a path relative to "
                                "the server's snapshot folder (--snapshot-dir)")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SnapshotPathError(f"snapshot path {shown} holds '..'; paths stay inside the "
                                "server's snapshot folder (--snapshot-dir)")
    if not parts:
        raise SnapshotPathError(f"snapshot path {shown} names no file")
    if any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):
        raise SnapshotPathError(f"snapshot path {shown} has a component over 255 bytes")
    return parts


class SnapshotDir:
    """The server's snapshot folder: created if missing, resolved once at start-up (the
    operator's choice, so a link there is followed once); client paths stay inside it."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ValueError(f"--snapshot-dir {str(root)!r} exists and is not a folder; "
                             "choose a folder") from None
        except OSError as exc:
            raise ValueError(f"--snapshot-dir {str(root)!r} cannot be created: "
                             f"{exc.strerror or exc}; choose a folder this user can write")
        self.root = root.resolve()
        if not self.root.is_dir():
            raise ValueError(f"--snapshot-dir {str(root)!r} is not a folder")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ValueError(f"--snapshot-dir {str(self.root)!r} is not writable by this user; "
                             "choose another folder")

    def _open_dir(self, parts: list[str], create: bool, shown: str) -> int:
        """A handle on the folder ``root/parts...``, every component opened without
        following links (``create``: make missing ones)."""
        fd = os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC,
                                  dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise SnapshotPathError(f"snapshot {shown}: folder {part!r} does not "
                                                "exist") from None
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:  # made meanwhile: open it as it is
                        pass
                    nfd = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC,
                                  dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise SnapshotPathError(
                            f"snapshot {shown}: {part!r} is a symbolic link or not a folder; "
                            "links are not followed") from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _in_folder(self, path: object, create: bool, fn: Callable[[int, str, str], T]) -> T:
        parts = split_relative(path)
        shown = repr("/".join(parts))
        dfd = self._open_dir(parts[:-1], create, shown)
        try:
            return fn(dfd, parts[-1], shown)
        finally:
            os.close(dfd)

    def normalize(self, path: object) -> str:
        """The client's path as the server uses it (``a//./b`` -> ``a/b``)."""
        return "/".join(split_relative(path))

    def open_read(self, path: object) -> BinaryIO:
        """Open a regular file inside the folder for reading (see :func:`open_regular`)."""
        def _open(dfd: int, name: str, shown: str) -> BinaryIO:
            try:
                return open_regular(name, dir_fd=dfd, follow=False, label=shown)
            except FileNotFoundError:
                raise SnapshotPathError(f"snapshot {shown} not found in the snapshot "
                                        "folder") from None
        return self._in_folder(path, False, _open)

    def write(self, path: object, writer: Callable[[int, str], T]) -> T:
        """Call ``writer(dir_fd, name)`` to write the file ``name`` in the path's folder
        (created as needed); refused if ``name`` exists and is not a regular file."""
        def _write(dfd: int, name: str, shown: str) -> T:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise SnapshotPathError(f"snapshot {shown} exists and is "
                                            f"{_kind(st.st_mode)}; remove it or choose "
                                            "another name")
            return writer(dfd, name)
        return self._in_folder(path, True, _write)

    def delete(self, path: object, check: Callable[[BinaryIO, str], None]) -> int:
        """Remove a regular file inside the folder once ``check(file, shown)`` accepted its
        content (raises otherwise); returns its size in bytes."""
        def _delete(dfd: int, name: str, shown: str) -> int:
            try:
                f = open_regular(name, dir_fd=dfd, follow=False, label=shown)
            except FileNotFoundError:
                raise SnapshotPathError(f"snapshot {shown} not found in the snapshot "
                                        "folder") from None
            with f:
                check(f, shown)
                size = os.fstat(f.fileno()).st_size
            os.unlink(name, dir_fd=dfd)
            return size
        return self._in_folder(path, False, _delete)
