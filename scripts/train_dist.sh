#!/bin/sh
# Full-softmax training on several processes with torchrun (DDP; NCCL on GPUs, gloo on CPU,
# chosen by the trainer at run time; --dist-backend overrides).
#
#   NPROC=4 scripts/train_dist.sh [--config FILE.yaml] DATASET [hfsoftmax-train flags...]
#
# Environment: NPROC (processes on this machine; default: the GPU count, or 2 on CPU),
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (several machines; defaults 1, 0,
# 127.0.0.1, 29500), PYTHON, SAVE_PATH (default: runs/train_dist).
#
# Shell: POSIX sh (dash and bash). -h/--help first: this text; no DATASET: usage, exit 2.
set -eu
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
_HF_USAGE="NPROC=N $0 [--config FILE.yaml] DATASET [hfsoftmax-train flags...]"
. "$ROOT/scripts/_torchrun.sh"
SAVE_PATH="${SAVE_PATH:-runs/train_dist}"
export SAVE_PATH
exec sh "$ROOT/scripts/train.sh" "$@"
