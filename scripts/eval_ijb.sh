#!/bin/sh
# IJB-B / IJB-C 1:1 verification of a checkpoint: aligns the loose crops by their five
# landmarks, embeds them (flip-sum), pools media then templates, scores the template pairs
# and prints the TPR at FPR = 1e-6 .. 1e-1 table; writes the JSON report, the ROC plot and
# the pair scores to the output folder.
#   usage: scripts/eval_ijb.sh MODEL_PATH IJB_DIR OUTPUTS [TARGET] [extra hfsoftmax.eval_ijb flags]
#   e.g.   scripts/eval_ijb.sh runs/x/best.pth /data/IJB_release/IJBC runs/x/ijbc IJBC
# IJB_DIR holds meta/ and loose_crop/ (InsightFace's IJB release); TARGET: IJBC (default) or
# IJBB. A bare state_dict (arcface_torch's backbone.pth) needs --arch and --embedding-size.
# Environment: PYTHON (default: python).
#
# Shell: POSIX sh (dash and bash). -h/--help first: this text; fewer than 3 arguments: usage,
# exit 2.
set -eu
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
if [ "$#" -lt 3 ]; then
    echo "usage: $0 MODEL_PATH IJB_DIR OUTPUTS [TARGET] [extra flags of python -m hfsoftmax.eval_ijb]" >&2
    exit 2
fi
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
model="$1" ijb="$2" out="$3"
shift 3
target=IJBC
case "${1:-}" in IJBC|IJBB) target="$1"; shift ;; esac
exec "${PYTHON:-python}" -m hfsoftmax.eval_ijb --load-path "$model" --ijb-dir "$ijb" \
    --out-dir "$out" --target "$target" "$@"
