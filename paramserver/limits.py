"""Every bound the server keeps: its flags' ranges, the memory a table may take, file handles.

Anyone who can reach the server's port is a client and may be hostile (``PROTOCOL.md``,
"Trust model"), so each size a message decides is bounded before memory is taken, and
each flag is checked once at start-up against the ranges below (one place for each
number; ``paramserver.py``'s ``--help`` and ``PROTOCOL.md`` quote them).
"""
from __future__ import annotations

import math

__all__ = ["FLAG_RANGES", "check_flag", "describe_range", "DEFAULT_MAX_HEADER_BYTES",
           "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_MAX_QUEUED_BYTES", "SNDHWM", "RCVHWM", "HEARTBEAT_IVL_S", "HEARTBEAT_TIMEOUT_S",
           "HANDSHAKE_S", "MAX_WORKER_TIMEOUT_S", "memory_shortfall", "raise_fd_limit", "gib"]

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

DEFAULT_MAX_MESSAGE_BYTES = 1 * GIB
DEFAULT_MAX_HEADER_BYTES = 64 * KIB
# Replies ZeroMQ may queue for one connection (its SNDHWM, with ROUTER_MANDATORY so that a
# full queue is reported, not blocked on). Past it the server keeps the connection's
# replies itself, up to DEFAULT_MAX_QUEUED_BYTES (--max-queued-bytes; one reply of any size
# always fits), and sends them as the connection reads; past that the connection is
# muted. So a client that never reads costs at most SNDHWM replies + that many bytes.
SNDHWM = 8
DEFAULT_MAX_QUEUED_BYTES = 64 * MIB
# Requests ZeroMQ may queue from one connection before it stops reading that connection
# (TCP then holds the client back): what a client can make the server buffer for its
# requests is this many messages of frames up to --max-message-bytes. A client of the
# protocol has one request in flight per connection (a pipelining one is slowed, not cut).
RCVHWM = 8
# ZeroMQ heartbeats: a peer that does not answer a PING within HEARTBEAT_TIMEOUT_S is
# disconnected (a vanished host, not an idle client: a live peer's ZeroMQ answers PINGs
# by itself); a connection that does not finish the ZeroMQ handshake within HANDSHAKE_S
# (a raw TCP connection holding a file handle) is closed.
HEARTBEAT_IVL_S = 10.0
HEARTBEAT_TIMEOUT_S = 30.0
HANDSHAKE_S = 10.0
MAX_WORKER_TIMEOUT_S = 7 * 24 * 3600.0

# flag: (low, high, what the value is); both ends inclusive.
FLAG_RANGES: dict[str, tuple[float, float, str]] = {
    "workers": (1, 4096, "a worker count"),
    # Finite on purpose: the timeout is what keeps a dead worker from stalling the others.
    "worker_timeout": (0.001, MAX_WORKER_TIMEOUT_S, "seconds (finite)"),
    "max_message_bytes": (1 * MIB, 16 * GIB, "bytes"),
    "max_header_bytes": (1 * KIB, 16 * MIB, "bytes"),
    "max_queued_bytes": (1 * MIB, 16 * GIB, "bytes"),
    "stats_interval": (0, 7 * 24 * 3600.0, "seconds (0: off)"),
}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def describe_range(name: str) -> str:
    """``"<unit> in [lo, hi]"`` for a flag of :data:`FLAG_RANGES` (for ``--help``)."""
    lo, hi, unit = FLAG_RANGES[name]
    return f"{unit} in [{_num(lo)}, {_num(hi)}]"


def check_flag(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``--name``, its value and its valid range when ``value``
    is outside :data:`FLAG_RANGES` (NaN and infinities are outside every range)."""
    lo, hi, _ = FLAG_RANGES[name]
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and lo <= value <= hi):
        raise ValueError(f"{flag} {value!r} is out of range: give {describe_range(name)}")


def gib(nbytes: float) -> str:
    """``nbytes`` as GiB with 2 decimals, for messages."""
    return f"{nbytes / GIB:.2f} GiB"


def memory_shortfall(new_bytes: int, held_bytes: int, what: str) -> str | None:
    """Why ``new_bytes`` more (a table, or the tables of a snapshot) do not fit in the memory
    available now, or None when they do.

    ``held_bytes``: what the server's tables take in all. Pages of those that were never
    written (zero momentum buffers) are not in memory yet but will be, so the part of
    ``held_bytes`` beyond this process's resident size is counted as still to come. A margin
    of 5 % of RAM (at least 256 MiB) is kept for the OS, replies and the rest of the server.
    """
    import psutil

    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    to_come = max(0, held_bytes - rss)
    margin = max(256 * MIB, vm.total // 20)
    room = vm.available - margin
    if new_bytes + to_come <= room:
        return None
    return (f"{what} needs {gib(new_bytes)} (weights + momentum), and the existing tables "
            f"{gib(to_come)} more as their pages fill, but only {gib(max(room, 0))} is "
            f"available ({gib(vm.available)} free minus a {gib(margin)} margin): shard it over "
            "more servers, or free memory")


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to the hard limit (each client
    connection holds one), so that a few hundred idle connections cannot starve the server
    of file handles; returns ``(soft, hard)`` as they are now."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    else:
        target = hard
    if soft != resource.RLIM_INFINITY and target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. above fs.nr_open: keep what we have
            return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)
