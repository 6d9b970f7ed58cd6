#!/usr/bin/env bash
# Check torch.distributed on this machine: NPROC processes under torchrun run all_reduce,
# broadcast and all_gather over the backend the trainer would pick (NCCL with GPUs, gloo on
# CPU; BACKEND overrides) and compare the results with the expected values.
#
#   NPROC=2 scripts/test_distributed.sh [--backend gloo]
#
# Environment: NPROC (default: the GPU count, or 2 on CPU), NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT, BACKEND, PYTHON. Exit status 0 and "distributed check passed" when all agree.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC:-}" ]]; then
  NPROC="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
backend_args=()
if [[ -n "${BACKEND:-}" ]]; then
  backend_args=(--backend "$BACKEND")
fi
exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  "$ROOT/scripts/test_distributed.py" "${backend_args[@]}" "$@"
