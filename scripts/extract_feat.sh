#!/bin/sh
# Features (image + horizontal flip, summed, L2-normalised) of every image of a list.
#   usage: scripts/extract_feat.sh PREFIX FILELIST LOAD_PATH [OUT.npy] [extra hfsoftmax.extract flags]
#   e.g.   scripts/extract_feat.sh images/ images/val.lst runs/demo/last.pth val_feats.npy
# Environment: PYTHON (default: python).
#
# Shell: POSIX sh (dash and bash). -h/--help first: this text; fewer than 3 arguments: usage,
# exit 2.
set -eu
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
if [ "$#" -lt 3 ]; then
    echo "usage: $0 PREFIX FILELIST LOAD_PATH [OUT.npy] [extra flags of python -m hfsoftmax.extract]" >&2
    exit 2
fi
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
prefix="$1" filelist="$2" load_path="$3" out="${4:-features.npy}"
if [ "$#" -ge 4 ]; then shift 4; else shift 3; fi
exec "${PYTHON:-python}" -m hfsoftmax.extract --prefix "$prefix" --filelist "$filelist" \
    --load-path "$load_path" --out "$out" "$@"
