#!/bin/sh
# Sourced by train_dist.sh, train_dist_hf.sh and test_distributed.sh (`. .../_torchrun.sh`),
# not run: sets NPROC (default: the GPU count, or 2 on CPU) and exports _HF_TORCHRUN_ARGS,
# the flags of `python -m torch.distributed.run` that train.sh / train_hf.sh put before the
# trainer when it is set. The caller sets PYTHON.
# Environment: NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (defaults 1, 0, 127.0.0.1,
# 29500).
#
# Shell: POSIX sh (dash and bash). The flags travel as one string, split on spaces by its
# readers, so each value must be a plain word (checked here). Run directly, it prints this
# header: exit 0 with -h/--help, else on stderr with exit 2.
# A caller whose first arguments are [--config FILE.yaml] DATASET (train_dist.sh,
# train_dist_hf.sh) sets _HF_USAGE, its usage line: without a DATASET it is printed and the
# caller exits 2, before torch is imported to count the GPUs.
case "$0" in
  *_torchrun.sh)
    case "${1:-}" in
      -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
      *) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
    esac ;;
esac
if [ -n "${_HF_USAGE:-}" ]; then  # the caller's own arguments (a sourced file sees them)
  case "${1:-}" in  # train.sh / train_hf.sh read the --config
    --config) _dataset="${3:--}" ;;
    --config=*) _dataset="${2:--}" ;;
    *) _dataset="${1:--}" ;;
  esac
  case "$_dataset" in
    -*) echo "usage: $_HF_USAGE  (-h for help)" >&2; exit 2 ;;
  esac
fi
if [ -z "${NPROC:-}" ]; then
  NPROC="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
export NPROC
for _v in "$NPROC" "${NNODES:-1}" "${NODE_RANK:-0}" "${MASTER_ADDR:-127.0.0.1}" \
          "${MASTER_PORT:-29500}"; do
  case "$_v" in
    ''|*[!A-Za-z0-9._:-]*)
      echo "error: torchrun setting '$_v' (NPROC, NNODES, NODE_RANK, MASTER_ADDR or" \
           "MASTER_PORT) must be a plain word: letters, digits, '.', '_', ':', '-'" >&2
      exit 2 ;;
  esac
done
export _HF_TORCHRUN_ARGS="--nproc_per_node $NPROC --nnodes ${NNODES:-1} \
--node_rank ${NODE_RANK:-0} --master_addr ${MASTER_ADDR:-127.0.0.1} \
--master_port ${MASTER_PORT:-29500}"
