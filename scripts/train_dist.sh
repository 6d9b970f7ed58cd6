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

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: NPROC=N $0 DATASET [hfsoftmax-train flags...]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC:-}" ]]; then
  NPROC="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
export _HF_LAUNCH="$PYTHON -m torch.distributed.run --nproc_per_node $NPROC \
--nnodes ${NNODES:-1} --node_rank ${NODE_RANK:-0} \
--master_addr ${MASTER_ADDR:-127.0.0.1} --master_port ${MASTER_PORT:-29500}"
SAVE_PATH="${SAVE_PATH:-runs/train_dist}" exec bash "$ROOT/scripts/train.sh" "$@"
