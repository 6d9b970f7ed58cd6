#!/bin/sh
# Exercise the CUDA/NCCL paths on one GPU end to end and fail loudly (under 10 minutes on
# one GPU): full and sampled training with mixed precision (bf16, fp16 + loss scaler), the
# device sampler, a parameter server and resume, extraction and eval on CUDA against the
# CPU, a 1-process NCCL group over the distributed code, the suite's GPU tests and the
# step breakdown. The steps and their checks: tools/gpu_check.py.
#
#   sh scripts/gpu_check.sh                     # on a GPU machine, from any folder
#   sh scripts/gpu_check.sh --device cpu --quick   # the same steps on the CPU, tiny (a test)
#
# Writes every log and summary.json (figures, steps, skips) to a scratch folder (--work DIR).
# Environment: PYTHON (default python).
# Shell: POSIX sh (dash and bash). -h/--help: this text.
set -eu
case "${1:-}" in
  -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$ROOT/tools/gpu_check.py" "$@"
