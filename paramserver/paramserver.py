"""The parameter server's command line: tables of float32 rows, synchronous SGD, snapshots.

Start it with ``python paramserver/paramserver.py`` (or the console entry
``hfsoftmax-paramserver``); ``--help`` lists every flag. One process serves one shard; a
client spreads rows over several processes. The wire protocol and the trust model are in
``PROTOCOL.md``; the server itself is :class:`paramserver.server.ParamServer`.

Every flag is checked before the server starts: a value out of range, a snapshot folder
that cannot be made, or a ``--restore`` file that is not a valid snapshot exits with code 2
and one line naming the problem.

>>> # python paramserver/paramserver.py --bind tcp://127.0.0.1:5570 --workers 2
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: make the package importable and stop this folder from shadowing it.
    _here = str(Path(__file__).resolve().parent)
    sys.path = [p for p in sys.path if p and Path(p).resolve() != Path(_here)]
    sys.path.insert(0, str(Path(_here).parent))

import zmq

from paramserver import limits
from paramserver.server import DEFAULT_BIND, ParamServer, RequestError, is_loopback
from paramserver.snapdir import DEFAULT_SNAPSHOT_DIR

__all__ = ["ParamServer", "RequestError", "is_loopback", "main", "build_parser"]

log = logging.getLogger("paramserver")
_range = limits.describe_range


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="paramserver",
        description="hfsoftmax parameter server: holds tables of float32 rows (the "
                    "classifier), answers pull/push over ZeroMQ and applies synchronous SGD "
                    "(torch.optim.SGD semantics) over --workers workers. Anyone who can reach "
                    "the port is a client: see 'Trust model' in paramserver/PROTOCOL.md.")
    p.add_argument("--bind", default=DEFAULT_BIND,
                   help="ZeroMQ address to listen on (default %(default)s; a port of * picks "
                        "a free one). A non-loopback address needs --curve-secret-key or "
                        "--insecure.")
    p.add_argument("--workers", type=int, default=1,
                   help="number of synchronous workers, ids 0..N-1: a step is applied once "
                        "each live worker pushed it (default %(default)s; "
                        f"{_range('workers')}). An id belongs to the connection that "
                        "registers it (or first pushes for it) until that connection closes.")
    p.add_argument("--worker-timeout", type=float, default=60.0,
                   help="seconds a pending step waits for the missing workers before they "
                        "are dropped (logged) and the step is applied without them "
                        f"(default %(default)s; {_range('worker_timeout')})")
    p.add_argument("--snapshot-dir", metavar="DIR", default=DEFAULT_SNAPSHOT_DIR,
                   help="the only folder the server reads and writes: snapshot, restore and "
                        "delete_snapshot paths are relative to it (sub-folders are created; "
                        "absolute paths, '..', symbolic links and non-regular files are "
                        "refused). Created at start (default: ./%(default)s, relative to "
                        "the server's working directory)")
    p.add_argument("--restore", metavar="PATH",
                   help="load this snapshot file before serving: a path relative to "
                        "--snapshot-dir, or an absolute path (it must be a regular file)")
    p.add_argument("--max-message-bytes", type=int,
                   default=limits.DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest message frame accepted and largest reply sent (default "
                        f"%(default)s; {_range('max_message_bytes')})")
    p.add_argument("--max-header-bytes", type=int, default=limits.DEFAULT_MAX_HEADER_BYTES,
                   help="largest JSON header frame accepted, checked before parsing "
                        f"(default %(default)s; {_range('max_header_bytes')}, and at most "
                        "1/16 of --max-message-bytes)")
    p.add_argument("--max-queued-bytes", type=int, default=limits.DEFAULT_MAX_QUEUED_BYTES,
                   help="bytes of replies the server keeps for one connection that reads "
                        f"slower than it asks, beyond the {limits.SNDHWM} ZeroMQ queues; past "
                        "it the connection's replies are dropped and its requests ignored "
                        "until it disconnects (logged). Default %(default)s; "
                        f"{_range('max_queued_bytes')}")
    p.add_argument("--curve-secret-key", metavar="FILE",
                   help="the server's CURVE key pair (*.key_secret file from "
                        "`python -m paramserver.keys`): encrypt and authenticate clients")
    p.add_argument("--curve-public-keys-dir", metavar="DIR",
                   help="folder of the public *.key files of the clients allowed to connect "
                        "(with --curve-secret-key)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without authentication (logs a warning)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="write the bound address to PATH once serving (for scripts/tests)")
    p.add_argument("--stats-interval", type=float, default=60.0,
                   help="seconds between request-count log lines; 0 disables "
                        f"(default %(default)s; {_range('stats_interval')})")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging level (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry ``hfsoftmax-paramserver``; returns the exit code (2: bad flags)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    soft, hard = limits.raise_fd_limit()  # each connection holds a file handle
    log.debug("open-file limit %d (hard %d)", soft, hard)
    try:
        server = ParamServer(args.bind, workers=args.workers,
                             worker_timeout=args.worker_timeout,
                             max_message_bytes=args.max_message_bytes,
                             max_header_bytes=args.max_header_bytes,
                             max_queued_bytes=args.max_queued_bytes,
                             snapshot_dir=args.snapshot_dir, restore=args.restore,
                             curve_secret_key=args.curve_secret_key,
                             curve_public_keys_dir=args.curve_public_keys_dir,
                             insecure=args.insecure, ready_file=args.ready_file,
                             stats_interval=args.stats_interval)
    except (ValueError, OSError, MemoryError, zmq.ZMQError) as exc:
        text = " ".join(str(exc).split())  # one line, whatever the message holds
        log.error("cannot start: %s", text if len(text) <= 2000 else text[:2000] + "...")
        return 2
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGTERM, server.stop)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
