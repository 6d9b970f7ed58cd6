#!/bin/sh
# Start a parameter server in the foreground; every argument goes to it (--help lists them).
#   scripts/start_paramserver.sh --bind tcp://127.0.0.1:5570 --workers 2
# Protocol, snapshots and authentication: paramserver/PROTOCOL.md.
# Environment: PYTHON (default: python).
#
# Shell: POSIX sh (dash and bash). --help is the server's own (exit 0); no arguments: a
# server with the defaults.
set -eu
here="$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)"
exec "${PYTHON:-python}" "$here/../paramserver/paramserver.py" "$@"
