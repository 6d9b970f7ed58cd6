#!/bin/sh
# HF-Softmax training: the classifier rows live in a parameter server; each batch's softmax
# runs over its labels plus the nearest classes found by an index over the rows.
#
#   scripts/train_hf.sh [--config FILE.yaml] DATASET [hfsoftmax-train flags...]
#   scripts/train_hf.sh [hfsoftmax-train flags...]      # no DATASET: the built-in demo
#
# DATASET: an InsightFace folder (train.rec, train.idx, property) or an image list file.
# Every other flag goes to `python -m hfsoftmax.train` (see its --help), e.g.
#   scripts/train_hf.sh datasets/data/faces_emore --arch ir50 --sampler hnsw --sample-num 8000
# --config FILE.yaml (one file, before DATASET; or DATASET --config FILE.yaml) gives the
# trainer a settings file, e.g. a preset of configs/: DATASET replaces its train-rec and the
# flags after DATASET override it:
#   scripts/train_hf.sh --config configs/ms1mv3_ir50.yaml datasets/data/ms1m-retinaface-t1
#
# The demo prepares the synthetic set once (datasets/data/synthetic), trains a small CPU
# network with HF-Softmax for a few minutes, verifies it on the set's held-out identities and
# prints where the checkpoint, logs, TensorBoard events and ROC plot went.
#
# Parameter server: the one at $PS_ADDR (comma-separated shard addresses) when set, else one
# started on 127.0.0.1 for this run (log in SAVE_PATH/paramserver.log) and stopped when the
# run ends. The started server writes and reads snapshots only inside the run's folder
# (its --snapshot-dir): SAVE_PATH, else the --save-path flag, else the folder of a --resume
# checkpoint (a resumed run continues in its own folder), else runs/train_hf (demo:
# runs/demo/<time>). Do not set save_path in a --config file instead: the server would not
# know the folder.
# Environment: PS_ADDR, PS_PORT (port of the started server; default: any free), PYTHON
# (default: python), SAVE_PATH,
# SYNTHETIC_DIR, DEMO_CLASSES, DEMO_PAIRS (demo data: default datasets/data/synthetic, 2000
# classes, 1000 verification pairs).
#
# Shell: POSIX sh (dash and bash). -h/--help anywhere: this text, before any data is made or
# server started (the trainer's flags: python -m hfsoftmax.train --help). No arguments: the
# demo.
set -eu
save_arg="" resume_arg="" prev=""
for arg in "$@"; do
  case "$prev" in
    --save-path) save_arg="$arg" ;;
    --resume) resume_arg="$arg" ;;
  esac
  case "$arg" in
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    --save-path=*) save_arg="${arg#--save-path=}" ;;
    --resume=*) resume_arg="${arg#--resume=}" ;;
  esac
  prev="$arg"
done
if [ -z "$save_arg" ] && [ -n "$resume_arg" ]; then  # continue in the checkpoint's folder
  if [ -d "$resume_arg" ]; then save_arg="$resume_arg"; else save_arg="$(dirname -- "$resume_arg")"; fi
fi
ROOT="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

config=""
case "${1:-}" in
  --config)
    if [ "$#" -lt 2 ]; then
      echo "error: --config needs a YAML file: $0 --config FILE.yaml DATASET [flags...]" >&2
      exit 2
    fi
    config="$2"; shift 2 ;;
  --config=*) config="${1#--config=}"; shift ;;
esac

demo=0
case "${1:--}" in
  -*) demo=1 ;;
  *) data="$1"; shift ;;
esac

if [ "$demo" -eq 1 ]; then
  data="${SYNTHETIC_DIR:-$ROOT/datasets/data/synthetic}"
  save="${SAVE_PATH:-${save_arg:-$ROOT/runs/demo/$(date +%Y%m%d-%H%M%S)}}"
  echo "== 1/3 synthetic data in $data (made once)"
  "$PYTHON" "$ROOT/datasets/prepare_synthetic.py" --out "$data" \
    --num-classes "${DEMO_CLASSES:-2000}" --images-per-class 20 --pairs "${DEMO_PAIRS:-1000}" \
    --seed 0
else
  save="${SAVE_PATH:-${save_arg:-runs/train_hf}}"
fi
mkdir -p "$save"

ps_pid=""
tmp="$(mktemp -d)"
cleanup() {
  if [ -n "$ps_pid" ]; then
    kill "$ps_pid" 2>/dev/null || true
    wait "$ps_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ps_answers() {
  "$PYTHON" -c 'import sys; from paramserver import ParamClient
c = ParamClient(sys.argv[1].split(","), timeout_s=3); c.ping(); c.close()' "$1" \
    >/dev/null 2>&1
}

# The trainer's command line is built back to front with `set --` (POSIX sh has no arrays):
# [torchrun flags] -m hfsoftmax.train SOURCE --sampled --ps ADDR [--ps-table T]
# --save-path SAVE [demo flags] [the user's flags].
if [ "$demo" -eq 1 ]; then
  # The demo's settings: a small CPU network, 10% of the classes in each batch's softmax,
  # 500 steps (~0.8 epoch; about 7 minutes at ~75 images/s on 2 busy cores).
  set -- --arch convnet-s --embedding-size 128 --head linear --sampler hnsw \
    --sample-num 200 --interval 100 --batch-size 64 --lr 0.1 --warmup-steps 50 \
    --max-steps 500 --lr-steps 0.6 --val-every 250 --workers 1 --print-freq 50 \
    --val-bins "$data/synthetic.bin" "$@"
fi
if [ -n "$config" ]; then
  set -- --config "$config" "$@"
fi
set -- --save-path "$save" "$@"

if [ -n "${PS_ADDR:-}" ] && ps_answers "$PS_ADDR"; then
  addr="$PS_ADDR"
  echo "using the parameter server at $addr"
  if [ "$demo" -eq 1 ]; then  # a shared server may hold an earlier demo's table
    set -- --ps-table "demo-$(date +%Y%m%d-%H%M%S)" "$@"
  fi
elif [ -n "${PS_ADDR:-}" ] && [ "$demo" -eq 0 ]; then
  echo "error: no parameter server answers at PS_ADDR=$PS_ADDR (unset PS_ADDR to start one" \
       "for this run)" >&2
  exit 1
else
  "$PYTHON" "$ROOT/paramserver/paramserver.py" --bind "tcp://127.0.0.1:${PS_PORT:-*}" \
    --workers "${PS_WORKERS:-1}" --snapshot-dir "$save" --ready-file "$tmp/address" \
    > "$save/paramserver.log" 2>&1 &
  ps_pid=$!
  tries=0
  while [ ! -s "$tmp/address" ]; do
    if ! kill -0 "$ps_pid" 2>/dev/null; then
      echo "error: the parameter server did not start:" >&2
      cat "$save/paramserver.log" >&2
      exit 1
    fi
    tries=$((tries + 1))
    if [ "$tries" -gt 300 ]; then
      echo "error: the parameter server did not come up in 30 s" \
           "(log: $save/paramserver.log)" >&2
      exit 1
    fi
    sleep 0.1
  done
  addr="$(cat "$tmp/address")"
  echo "started a parameter server at $addr (log: $save/paramserver.log)"
fi

if [ -d "$data" ]; then
  source_flag=--train-rec
else
  source_flag=--train-filelist
fi
set -- -m hfsoftmax.train "$source_flag" "$data" --sampled --ps "$addr" "$@"
if [ "$demo" -eq 1 ]; then
  echo "== 2/3 training (HF-Softmax, CPU); progress below and in $save/train.log"
fi
# _HF_TORCHRUN_ARGS is set by scripts/train_dist_hf.sh (scripts/_torchrun.sh): plain words,
# split on purpose.
if [ -n "${_HF_TORCHRUN_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  set -- -m torch.distributed.run $_HF_TORCHRUN_ARGS "$@"
fi
"$PYTHON" "$@"

if [ "$demo" -eq 1 ]; then
  echo "== 3/3 verification of the best checkpoint on held-out identities"
  ckpt="$save/best.pth"
  [ -f "$ckpt" ] || ckpt="$save/last.pth"
  "$PYTHON" -m hfsoftmax.eval --load-path "$ckpt" --bins "$data/synthetic.bin" \
    --out-dir "$save/eval" --no-progress
  cat <<EOF

Demo finished.
  checkpoint:   $ckpt   (last: $save/last.pth)
  classifier:   $save/rows_step*.safetensors (parameter-server snapshot of the same step)
  logs:         $save/train.log, $save/metrics.csv, $save/val.csv
  TensorBoard:  tensorboard --logdir $save/tb
  ROC / report: $save/eval/synthetic_roc.png, $save/eval/synthetic.json
EOF
fi
