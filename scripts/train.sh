#!/bin/sh
# Full-softmax training (one process; scripts/train_dist.sh for several).
#
#   scripts/train.sh [--config FILE.yaml] DATASET [hfsoftmax-train flags...]
#
# DATASET: an InsightFace folder (train.rec, train.idx, property) or an image list file
# ('relative/path.jpg label' lines; paths relative to the list's folder or --train-prefix).
# Every other flag goes to `python -m hfsoftmax.train` (see its --help), e.g.
#   scripts/train.sh datasets/data/faces_emore --arch ir50 --head arcface --epochs 20
# Environment: PYTHON (default: python), SAVE_PATH (default: runs/train).
#
# Shell: POSIX sh (dash and bash). -h/--help first: this text; no DATASET: usage, exit 2.
set -eu
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
config=""
case "${1:-}" in
  --config) if [ "$#" -lt 2 ]; then set --; else config="$2"; shift 2; fi ;;
  --config=*) config="${1#--config=}"; shift ;;
esac
case "${1:--}" in
  -*) echo "usage: $0 [--config FILE.yaml] DATASET [hfsoftmax-train flags...]  (DATASET: .rec folder or" \
           "image list; -h for help)" >&2
      exit 2 ;;
esac
data="$1"
shift
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

if [ -d "$data" ]; then
  source_flag=--train-rec
else
  source_flag=--train-filelist
fi
if [ -n "$config" ]; then
  set -- --config "$config" "$@"
fi
set -- -m hfsoftmax.train "$source_flag" "$data" --save-path "${SAVE_PATH:-runs/train}" "$@"
# _HF_TORCHRUN_ARGS is set by scripts/train_dist.sh (scripts/_torchrun.sh): plain words,
# split on purpose.
if [ -n "${_HF_TORCHRUN_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  set -- -m torch.distributed.run $_HF_TORCHRUN_ARGS "$@"
fi
exec "$PYTHON" "$@"
