# Sourced by train_dist.sh and train_dist_hf.sh (not run directly): checks the DATASET
# argument and sets NPROC (default: the GPU count, or 2 on CPU) and _HF_LAUNCH, the torchrun
# command line that train.sh / train_hf.sh start the trainer with.
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
