#!/usr/bin/env bash
# Start a parameter server in the foreground; every argument goes to it (see --help).
#   scripts/start_paramserver.sh --bind tcp://127.0.0.1:5570 --workers 2
# Protocol, snapshots and authentication: paramserver/PROTOCOL.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/../paramserver/paramserver.py" "$@"
