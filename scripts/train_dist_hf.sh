#!/bin/sh
# HF-Softmax training on several processes with torchrun; every process is a worker of the
# parameter server (at $PS_ADDR, or one started on loopback for the run with
# --workers NPROC x NNODES and stopped when it ends).
#
#   NPROC=4 scripts/train_dist_hf.sh [--config FILE.yaml] DATASET [hfsoftmax-train flags...]
#
# Environment: NPROC (default: the GPU count, or 2 on CPU), NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT (as scripts/train_dist.sh), PS_ADDR (comma-separated shard addresses; a
# multi-machine run needs a server every machine reaches, started with --workers equal to
# the total process count), PYTHON, SAVE_PATH (default: runs/train_dist_hf).
#
# Shell: POSIX sh (dash and bash). -h/--help first: this text; no DATASET: usage, exit 2
# (unlike scripts/train_hf.sh, there is no several-process demo).
set -eu
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
_HF_USAGE="NPROC=N $0 [--config FILE.yaml] DATASET [hfsoftmax-train flags...]"
. "$ROOT/scripts/_torchrun.sh"
case "$NPROC" in
  *[!0-9]*) echo "error: NPROC must be a number of processes here (it sizes the server's" \
                 "--workers), got '$NPROC'" >&2
            exit 2 ;;
esac
PS_WORKERS=$((NPROC * ${NNODES:-1}))
SAVE_PATH="${SAVE_PATH:-runs/train_dist_hf}"
export PS_WORKERS SAVE_PATH
exec sh "$ROOT/scripts/train_hf.sh" "$@"
