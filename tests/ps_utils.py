"""Start real parameter-server processes on free loopback ports, for tests.

>>> proc, address = start_server("--workers", "2")      # doctest: +SKIP
>>> ...
>>> stop_server(proc)                                      # doctest: +SKIP

or, as a context manager that always stops it: ``with running_server() as (proc, addr):``.
The server binds ``tcp://127.0.0.1:*`` (the OS picks a free port, so no races between
parallel tests) and reports the bound address through ``--ready-file``. Its log goes to a
file whose path is ``proc.log_path`` (shown when a start fails). Unless the arguments give
``--snapshot-dir``, its snapshot folder is a fresh temp folder, ``proc.snapshot_dir`` (never
the default ``./paramserver-snapshots`` in the repository).
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = ROOT / "paramserver" / "paramserver.py"

__all__ = ["start_server", "stop_server", "running_server", "server_log", "ps_server",
           "SERVER_SCRIPT"]


def start_server(*extra_args: str, timeout_s: float = 30.0, bind: str = "tcp://127.0.0.1:*",
                 log_level: str = "INFO", preexec_fn=None) -> tuple[subprocess.Popen, str]:
    """Run ``python paramserver/paramserver.py`` as a subprocess; return ``(process,
    address)`` once it serves. Raises ``RuntimeError`` with the server's log if it exits or
    does not come up within ``timeout_s``. ``preexec_fn``: run in the child before the
    server starts (e.g. to lower a resource limit)."""
    workdir = Path(tempfile.mkdtemp(prefix="ps-test-"))
    ready = workdir / "address"
    log_path = workdir / "server.log"
    log = open(log_path, "wb")
    extra = [str(a) for a in extra_args]
    snapshot_dir = next((Path(b) for a, b in zip(extra, extra[1:]) if a == "--snapshot-dir"),
                        None)
    if snapshot_dir is None:
        snapshot_dir = workdir / "snapshots"
        extra += ["--snapshot-dir", str(snapshot_dir)]
    cmd = [sys.executable, str(SERVER_SCRIPT), "--bind", bind, "--ready-file", str(ready),
           "--log-level", log_level, *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                            start_new_session=True, preexec_fn=preexec_fn)
    log.close()
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.snapshot_dir = snapshot_dir  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            return proc, ready.read_text().strip()
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    stop_server(proc)
    raise RuntimeError(f"parameter server {cmd} did not start (exit code {proc.returncode}); "
                       f"log:\n{log_path.read_text(errors='replace')}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 10.0) -> int | None:
    """SIGTERM, wait, then SIGKILL if needed; returns the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
    return proc.returncode


def server_log(proc: subprocess.Popen) -> str:
    """The server's log so far."""
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


@contextlib.contextmanager
def running_server(*extra_args: str, **kwargs):
    """``with running_server("--workers", "2") as (proc, address): ...``; always stopped."""
    proc, address = start_server(*extra_args, **kwargs)
    try:
        yield proc, address
    finally:
        stop_server(proc)


try:  # a fixture for tests that just need one server: `from tests.ps_utils import ps_server`
    import pytest

    @pytest.fixture
    def ps_server():
        """A fresh server (``--workers 1``) for one test: yields its address."""
        with running_server() as (_, address):
            yield address
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pass


def run_workers(fn, ids, timeout_s: float = 60.0) -> None:
    """Run ``fn(k)`` for every k in ``ids`` on its own thread (one parameter-server client
    each), wait for all, and fail with every exception a worker raised."""
    import threading

    errors: list[BaseException] = []

    def guarded(k):
        try:
            fn(k)
        except BaseException as exc:  # surfaced below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in ids]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout_s)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads), f"workers still running after {timeout_s} s"
