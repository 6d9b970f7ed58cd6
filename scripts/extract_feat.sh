#!/usr/bin/env bash
# Features (image + horizontal flip, summed, L2-normalised) of every image of a list.
#   usage: scripts/extract_feat.sh PREFIX FILELIST LOAD_PATH [OUT.npy] [extra hfsoftmax.extract flags]
#   e.g.   scripts/extract_feat.sh images/ images/val.lst runs/demo/last.pth val_feats.npy
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: $0 PREFIX FILELIST LOAD_PATH [OUT.npy] [extra flags of python -m hfsoftmax.extract]" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
prefix="$1" filelist="$2" load_path="$3" out="${4:-features.npy}"
shift $(( $# < 4 ? $# : 4 ))
exec "${PYTHON:-python}" -m hfsoftmax.extract --prefix "$prefix" --filelist "$filelist" \
    --load-path "$load_path" --out "$out" "$@"
