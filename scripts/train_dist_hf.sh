#!/usr/bin/env bash
# HF-Softmax training on several processes with torchrun; every process is a worker of the
# parameter server (at $PS_ADDR, or one started on loopback for the run with
# --workers NPROC x NNODES and stopped when it ends).
#
#   NPROC=4 scripts/train_dist_hf.sh DATASET [hfsoftmax-train flags...]
#
# Environment: NPROC (default: the GPU count, or 2 on CPU), NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT (as scripts/train_dist.sh), PS_ADDR (comma-separated shard addresses; a
# multi-machine run needs a server every machine reaches, started with --workers equal to
# the total process count), PYTHON, SAVE_PATH (default: runs/train_dist_hf).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_torchrun.sh"
export PS_WORKERS=$((NPROC * ${NNODES:-1}))
SAVE_PATH="${SAVE_PATH:-runs/train_dist_hf}" exec bash "$ROOT/scripts/train_hf.sh" "$@"
