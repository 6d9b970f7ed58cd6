"""Make CURVE key pairs for the parameter server and its clients.

    python -m paramserver.keys KEYDIR server          # KEYDIR/server.key, server.key_secret
    python -m paramserver.keys KEYDIR/clients worker0 # one pair per client

Start the server with ``--curve-secret-key KEYDIR/server.key_secret
--curve-public-keys-dir KEYDIR/clients`` (a folder holding the *public* ``.key`` files of the
allowed clients only), and each client with
``ParamClient(addr, curve_server_key="KEYDIR/server.key",
curve_secret_key="KEYDIR/clients/worker0.key_secret")``. Keep ``*.key_secret`` files private
(they are written with mode 0600).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def make_keys(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``folder/name.key`` (public) and ``folder/name.key_secret``; return both paths."""
    from zmq import auth as zmq_auth

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (folder / f"{name}{suffix}").exists():
            raise FileExistsError(f"{folder / (name + suffix)} exists; choose another name "
                                  "or delete it first")
    old = os.umask(0o077)
    try:
        public, secret = zmq_auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paramserver.keys",
                                description="Create a CURVE key pair (public NAME.key, "
                                            "secret NAME.key_secret) in FOLDER.")
    p.add_argument("folder", help="where to write the key files (created if missing)")
    p.add_argument("name", help="key pair name, e.g. server or worker0")
    args = p.parse_args(argv)
    try:
        public, secret = make_keys(args.folder, args.name)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
