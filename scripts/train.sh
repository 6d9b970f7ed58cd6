#!/usr/bin/env bash
# Full-softmax training (one process; scripts/train_dist.sh for several).
#
#   scripts/train.sh DATASET [hfsoftmax-train flags...]
#
# DATASET: an InsightFace folder (train.rec, train.idx, property) or an image list file
# ('relative/path.jpg label' lines; paths relative to the list's folder or --train-prefix).
# Every other flag goes to `python -m hfsoftmax.train` (see its --help), e.g.
#   scripts/train.sh datasets/data/faces_emore --arch ir50 --head arcface --epochs 20
# Environment: PYTHON (default: python), SAVE_PATH (default: runs/train).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 DATASET [hfsoftmax-train flags...]  (DATASET: .rec folder or image list)" >&2
  exit 2
fi
data="$1"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

if [[ -d "$data" ]]; then
  source_args=(--train-rec "$data")
else
  source_args=(--train-filelist "$data")
fi
# _HF_LAUNCH is set by scripts/train_dist.sh: torchrun with its process count.
read -r -a launch <<< "${_HF_LAUNCH:-$PYTHON}"
exec "${launch[@]}" -m hfsoftmax.train "${source_args[@]}" \
  --save-path "${SAVE_PATH:-runs/train}" "$@"
