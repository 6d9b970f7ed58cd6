#!/usr/bin/env bash
# Full-softmax training on several processes with torchrun (DDP; NCCL on GPUs, gloo on CPU,
# chosen by the trainer at run time; --dist-backend overrides).
#
#   NPROC=4 scripts/train_dist.sh DATASET [hfsoftmax-train flags...]
#
# Environment: NPROC (processes on this machine; default: the GPU count, or 2 on CPU),
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (several machines; defaults 1, 0,
# 127.0.0.1, 29500), PYTHON, SAVE_PATH (default: runs/train_dist).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_torchrun.sh"
SAVE_PATH="${SAVE_PATH:-runs/train_dist}" exec bash "$ROOT/scripts/train.sh" "$@"
