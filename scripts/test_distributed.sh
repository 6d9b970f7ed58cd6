#!/bin/sh
# Check torch.distributed on this machine: NPROC processes under torchrun run all_reduce,
# broadcast and all_gather over the backend the trainer would pick (NCCL with GPUs, gloo on
# CPU; BACKEND overrides) and compare the results with the expected values.
#
#   NPROC=2 scripts/test_distributed.sh [--backend gloo]
#
# Environment: NPROC (default: the GPU count, or 2 on CPU), NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT, BACKEND, PYTHON. Exit status 0 and "distributed check passed" when all agree.
#
# Shell: POSIX sh (dash and bash). -h/--help first: this text (no processes started).
set -eu
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
. "$ROOT/scripts/_torchrun.sh"
if [ -n "${BACKEND:-}" ]; then
  set -- --backend "$BACKEND" "$@"
fi
# shellcheck disable=SC2086  # plain words (scripts/_torchrun.sh), split on purpose
exec "$PYTHON" -m torch.distributed.run $_HF_TORCHRUN_ARGS \
  "$ROOT/scripts/test_distributed.py" "$@"
