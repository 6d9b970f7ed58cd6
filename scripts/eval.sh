#!/bin/sh
# Face verification of a checkpoint on every known .bin in a dataset folder
# (lfw, cfp_ff, cfp_fp, agedb_30, calfw, cplfw, synthetic); prints a table and writes the
# JSON reports and ROC plots to the output folder.
#   usage: scripts/eval.sh ARCH MODEL_PATH DATASET_PATH OUTPUTS [extra hfsoftmax.eval flags]
#   e.g.   scripts/eval.sh convnet-s runs/demo/last.pth datasets/synthetic runs/demo/eval
# Environment: PYTHON (default: python).
#
# Shell: POSIX sh (dash and bash). -h/--help first: this text; fewer than 4 arguments: usage,
# exit 2.
set -eu
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
if [ "$#" -lt 4 ]; then
    echo "usage: $0 ARCH MODEL_PATH DATASET_PATH OUTPUTS [extra flags of python -m hfsoftmax.eval]" >&2
    exit 2
fi
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
arch="$1" model="$2" data="$3" out="$4"
shift 4
exec "${PYTHON:-python}" -m hfsoftmax.eval --arch "$arch" --load-path "$model" \
    --data-dir "$data" --out-dir "$out" "$@"
