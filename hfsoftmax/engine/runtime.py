"""How this process runs: its log handlers, its device, and its hold on the run folder.

The run folder (``--save-path``) belongs to one trainer at a time: :class:`RunLock` takes an
exclusive ``flock`` on ``<folder>/.hfsoftmax.lock`` and writes its pid, host and start time
into it. A second trainer on the same folder is refused with a message naming the holder.
The kernel releases a ``flock`` when its process dies, however it dies (kill -9 included),
so a killed run's lock is taken over by the next trainer without any stale-lock guessing.
(``flock`` is advisory and local: two hosts writing one NFS folder are not covered.)

>>> with RunLock("runs/x"):          # raises UsageError while another trainer holds it
...     train()
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time

import torch

from .. import distributed as hd

__all__ = ["setup_logging", "remove_handlers", "pick_device", "RunLock", "LOCK_NAME"]

LOCK_NAME = ".hfsoftmax.lock"


def setup_logging(save_path: str, rank: int) -> list[logging.Handler]:
    """Console and ``train.log`` handlers on rank 0; warnings only on the other ranks.

    Returns the handlers added to the root logger (:func:`remove_handlers` takes them off).
    """
    root = logging.getLogger()
    if rank == 0:
        root.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                datefmt="%H:%M:%S")
        handlers: list[logging.Handler] = [
            logging.StreamHandler(sys.stderr),
            logging.FileHandler(os.path.join(save_path, "train.log"), encoding="utf-8")]
    else:
        root.setLevel(logging.WARNING)
        fmt = logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
        handlers = [logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    return handlers


def remove_handlers(handlers: list[logging.Handler]) -> None:
    """Take :func:`setup_logging`'s handlers off the root logger and close them."""
    for h in handlers:
        logging.getLogger().removeHandler(h)
        h.close()


def pick_device(name: str) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU. ``cuda`` without an
    index: this rank's GPU (``LOCAL_RANK``). ``cuda:N`` must exist, and under torchrun must
    be this rank's own GPU (N == ``LOCAL_RANK``): every rank on one GPU would run, slowly,
    until memory ran out."""
    from .config import UsageError

    if name == "auto":
        return torch.device("cuda", hd.local_rank()) if torch.cuda.is_available() \
            else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use "
                             "--device cpu (or auto)")
        if dev.index is None:
            dev = torch.device("cuda", hd.local_rank())
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise UsageError(f"--device {dev}: this machine has {count} GPU(s) "
                             f"(cuda:0..cuda:{count - 1})")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dev.index != hd.local_rank():
            raise UsageError(f"--device {name} under torchrun: this process is LOCAL_RANK "
                             f"{hd.local_rank()}, and each process takes its own GPU; use "
                             "--device cuda (or auto): rank r takes cuda:r, and "
                             "CUDA_VISIBLE_DEVICES picks the GPUs")
    return dev


class RunLock:
    """An exclusive hold on a run folder (see the module docstring); a context manager.

    ``acquire`` raises :class:`~hfsoftmax.engine.config.UsageError` naming the holder (pid,
    host, since when) if another live process holds the folder.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        from .config import UsageError

        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"--save-path {self.folder} is in use by another trainer "
                             f"({holder}); wait for it to end, or pick another --save-path"
                             ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
