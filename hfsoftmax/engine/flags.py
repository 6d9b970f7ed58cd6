"""The trainer's flags: every flag, its default and its help text, in this one place
(:func:`build_parser`); how they are layered with a checkpoint and a YAML file, and checked,
is :mod:`hfsoftmax.engine.config`.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from ..heads import sampled_config
from .argtypes import (nonneg_float as _nonneg_float, nonneg_int as _nonneg_int,
                       positive_float as _positive_float, positive_int as _positive_int,
                       unit_float as _unit_float)

__all__ = ["build_parser", "parse_key_values", "HEADS", "SAMPLERS", "ROW_STORES",
           "DEFAULT_SAVE_PATH", "AMP_MODES", "LR_SCHEDULES", "OPTIMIZERS", "DECODERS",
           "RECIPE_RUNTIME"]

HEADS = ("linear", "cosface", "arcface")
SAMPLERS = ("annoy", "hnsw", "faiss", "exact", "device", "random")
ROW_STORES = ("auto", "local", "server", "dist")
DEFAULT_SAVE_PATH = "runs/train"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one; a flag whose default is None (decided at
    run time: its help says how) or empty shows none."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d):
            return action.help
        return super()._get_help_string(action)


def _bool(s: str) -> bool:
    low = str(s).strip().lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {s!r}")


def _key_value(s: str) -> str:
    key, sep, value = s.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE (e.g. nprobe=32), got {s!r}")
    return f"{key.strip()}={value.strip()}"


def parse_key_values(items: list[str]) -> dict[str, Any]:
    """``["nprobe=32", "index_type=ivf"]`` -> ``{"nprobe": 32, "index_type": "ivf"}``
    (numbers and true/false converted, anything else kept as a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = _key_value(item).partition("=")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[key] = conv(value)
                break
            except ValueError:
                pass
        else:
            out[key] = value
    return out


def _ps_addresses(s: str) -> list[str]:
    return [a for a in s.replace(",", " ").split() if a]


AMP_MODES = ("off", "bf16", "fp16")
#: the recipe's flags that say how this machine runs (never taken from a checkpoint; added to
#: :data:`hfsoftmax.engine.config.RUNTIME`)
RECIPE_RUNTIME = ("scaler_growth_interval", "split_backward", "channels_last",
                  "cudnn_benchmark", "tf32", "ddp_bucket_view", "ddp_static_graph",
                  "dist_timeout", "decoder")
LR_SCHEDULES = ("step", "poly", "cosine")
OPTIMIZERS = ("sgd", "adamw")
DECODERS = ("torchvision", "pil")


def _amp_mode(s: str) -> str:
    """``--amp`` values; true/false (a YAML boolean, or a setting of the older on/off flag)
    read as bf16/off."""
    low = str(s).strip().lower()
    low = {"true": "bf16", "false": "off", "none": "off"}.get(low, low)
    if low not in AMP_MODES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(AMP_MODES)}, got {s!r}")
    return low


def _betas(s: str) -> list[float]:
    """``0.9,0.999`` (or a stored list, read back as ``[0.9, 0.999]``) -> two floats in [0, 1)."""
    parts = [x for x in str(s).strip().strip("[]()").replace(",", " ").split() if x]
    try:
        vals = [float(x) for x in parts]
    except ValueError:
        vals = []
    if len(vals) != 2 or not all(0.0 <= v < 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"must be two numbers in [0, 1) as B1,B2 (e.g. "
                                         f"0.9,0.999), got {s!r}")
    return vals


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The GPU recipe's flags (schedule, optimizer, clipping, scaler, data path, DDP and
    backend switches), in their own groups; checked by
    :func:`hfsoftmax.engine.recipe.validate_recipe`."""
    g = p.add_argument_group("schedule and optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="the backbone's (and the full head's) optimizer; adamw takes --lr, "
                        "--weight-decay and --adam-betas, not --momentum (the sampled rows "
                        "keep their own SGD: give --row-lr-mult with adamw)")
    g.add_argument("--adam-betas", type=_betas, default=[0.9, 0.999], metavar="B1,B2",
                   help="AdamW's betas")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="step",
                   help="step: x --gamma at --lr-steps; poly: (1 - t)^--lr-power; cosine: "
                        "half a cosine; t runs from the warm-up's end to the end of --epochs "
                        "(--max-steps stops early without changing it), so the LR is a "
                        "function of the step alone and a resumed run takes the same")
    g.add_argument("--lr-power", type=_positive_float, default=2.0,
                   help="exponent of the poly schedule (arcface_torch: 2)")
    g.add_argument("--min-lr", type=_nonneg_float, default=0.0,
                   help="where the poly and cosine schedules end")
    g.add_argument("--warmup-epochs", type=_nonneg_float, default=0.0,
                   help="linear learning-rate warm-up over this many (possibly fractional) "
                        "epochs; give it or --warmup-steps")
    g.add_argument("--clip-grad-norm", type=_nonneg_float, default=0.0,
                   help="clip the backbone's gradients to this total L2 norm (after the loss "
                        "scaler's unscale; arcface_torch: 5); 0: off. The full head's weight "
                        "and the sampled rows are not clipped")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                   help="BatchNorm statistics over all ranks (SyncBatchNorm; GPUs only)")

    g = p.add_argument_group("GPU runtime")
    g.add_argument("--scaler-growth-interval", type=_positive_int, default=2000,
                   help="--amp fp16: steps without overflow before the loss scale doubles "
                        "(arcface_torch: 100); an overflow halves it and skips the step")
    g.add_argument("--split-backward", action=argparse.BooleanOptionalAction, default=True,
                   help="backward in two parts, the head's first: the sampled head's row "
                        "gradients are then pushed from a worker thread while the backbone's "
                        "backward runs (exactly the same result as one backward)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC memory format for the backbone (faster convolutions on GPUs "
                        "with tensor cores, with --amp)")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="let cuDNN time its convolution algorithms on the first steps")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="TF32 matmuls and convolutions on Ampere or newer GPUs (default: "
                        "torch's, convolutions only)")
    g.add_argument("--ddp-bucket-view", action=argparse.BooleanOptionalAction, default=True,
                   help="DDP's gradient_as_bucket_view (gradients live in the all-reduce "
                        "buckets: less memory, one copy fewer)")
    g.add_argument("--ddp-static-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="DDP's static_graph (the same parameters used every step)")
    g.add_argument("--dist-timeout", type=_positive_float, default=1800.0,
                   help="seconds a collective may wait for the other ranks before the run "
                        "fails (torch.distributed's timeout)")
    g.add_argument("--decoder", choices=DECODERS, default="torchvision",
                   help="JPEG decoder of the data-loading workers (images go to the device "
                        "as uint8 and are normalised and flipped there); torchvision.io "
                        "measured faster than PIL (benchmarks/README.md, Data)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hfsoftmax-train`` (``python -m hfsoftmax.train``)."""
    p = argparse.ArgumentParser(
        prog="hfsoftmax-train",
        description="Train a face-embedding backbone with a full softmax or with HF-Softmax "
                    "(--sampled: the softmax of each batch runs over its labels plus the "
                    "nearest classes found by an index over the classifier rows, which live in "
                    "a parameter server (--ps) or in this process). Single process: "
                    "`python -m hfsoftmax.train ...`; several: `torchrun --nproc_per_node N "
                    "-m hfsoftmax.train ...`.",
        formatter_class=_HelpFormatter)
    p.add_argument("--config", metavar="YAML", nargs="+", default=None,
                   help="YAML file(s) of settings (keys: flag names); a later file overrides "
                        "an earlier one, command-line flags override them all")

    g = p.add_argument_group("data")
    g.add_argument("--train-rec", metavar="DIR", default=None,
                   help="InsightFace training folder (train.rec, train.idx, property)")
    g.add_argument("--train-filelist", metavar="FILE", default=None,
                   help="image list ('relative/path.jpg label' lines), with --train-prefix")
    g.add_argument("--train-prefix", metavar="DIR", default=None,
                   help="folder the --train-filelist paths are relative to (default: the "
                        "list file's folder)")
    g.add_argument("--val-bins", metavar="BIN", nargs="*", default=[],
                   help="verification pair files (lfw.bin, cfp_fp.bin, ...) evaluated "
                        "every --val-every steps; the best mean accuracy is kept as best.pth")
    g.add_argument("--num-classes", type=_positive_int, default=None,
                   help="number of classes (default: from the data)")
    g.add_argument("--workers", type=_nonneg_int, default=None,
                   help="data-loading worker processes per rank (0: load in the main process; "
                        "default: this rank's share of the CPU cores less one, 1 to 16)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips, seeded by (seed, epoch, sample) so a resumed "
                        "or distributed run sees the same flips")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="ir50",
                   help="backbone: resnet18/34/50/101, ir18/34/50/100, mobilefacenet, "
                        "convnet-s, convnet-s-gn (small CPU demo nets)")
    g.add_argument("--embedding-size", type=_positive_int, default=256,
                   help="embedding (feature) dimension")
    g.add_argument("--head", choices=HEADS, default="cosface",
                   help="logits: linear (plain softmax), cosface or arcface (margin heads)")
    g.add_argument("--scale", type=float, default=None,
                   help="margin heads' scale s (default 64; 30 for the small CPU nets "
                        "convnet-s and convnet-s-gn, which do not train well at 64)")
    g.add_argument("--margin", type=float, default=None,
                   help="margin m (default: cosface 0.35, arcface 0.5 radians; 0.2 for both "
                        "with convnet-s and convnet-s-gn)")

    g = p.add_argument_group("HF-Softmax (sampled head)")
    g.add_argument("--sampled", action="store_true",
                   help="train with the sampled head: softmax over --sample-num selected "
                        "classes per batch instead of all")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="class selection: annoy (the paper's hashing forest; the default on "
                        "the CPU), hnsw, faiss, exact (brute force), device (exact top-k over a "
                        "copy of the rows on the features' device, never stale; the default "
                        "where the run's device is a GPU), random (Partial FC's uniform "
                        "negatives); needs --sampled")
    g.add_argument("--sample-num", type=_positive_int, default=None,
                   help="classes per batch softmax (the batch's labels + nearest + random; "
                        "default 1000); needs --sampled")
    g.add_argument("--interval", type=_positive_int, default=100,
                   help="rebuild the sampler's index every this many steps")
    g.add_argument("--ntrees", type=_positive_int, default=50,
                   help="annoy: trees in the forest")
    g.add_argument("--sampler-opt", type=_key_value, nargs="*", default=[],
                   metavar="KEY=VALUE",
                   help="backend options of the sampler's index, e.g. nprobe=32 (faiss), "
                        "search_k=5000 (annoy), ef=128 (hnsw); see hfsoftmax/samplers/README.md")
    sampled_config.add_arguments(g)
    g.add_argument("--background-rebuild", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="rebuild the index on a background thread (training queries the old "
                        "one meanwhile); --no-background-rebuild makes runs reproducible")
    g.add_argument("--sampler-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the ANN index in its own process, which reads the rows from the "
                        "parameter server itself, so the trainer never holds all rows or the "
                        "index (default: on with --ps, off without)")
    g.add_argument("--index-threads", type=_nonneg_int, default=None,
                   help="OpenMP/torch threads of the index process (--sampler-process); 1 "
                        "keeps a rebuild from competing with the trainer for cores (0: the "
                        "libraries' default, which under torchrun is OMP_NUM_THREADS=1; "
                        "default: the CPU cores over the processes on this host)")
    g.add_argument("--recall-every", type=_nonneg_int, default=None,
                   help="every this many steps, log the fraction of the true top-10 classes "
                        "(exact search over all rows on rank 0's CPU) that the selection "
                        "contains (0: off; default: 200 up to 100,000 classes, off above, "
                        "where one search takes seconds)")
    g.add_argument("--row-store", choices=ROW_STORES, default="auto",
                   help="where the sampled head's rows live: local (in this process; every "
                        "rank a copy), server (the parameter server at --ps), dist (sharded "
                        "over the torch.distributed ranks, each holding num_classes / W rows "
                        "and selecting over its shard: hfsoftmax/rowstore_dist.py; --sampler "
                        "device, exact or random), auto (server with --ps, else local)")
    g.add_argument("--ps", type=_ps_addresses, default=None, metavar="ADDRS",
                   help="parameter-server address(es), comma-separated (several: row shards), "
                        "e.g. tcp://127.0.0.1:5570; default: the rows live in this process")
    g.add_argument("--ps-table", default="classifier",
                   help="table name on the parameter server")
    g.add_argument("--ps-timeout", type=float, default=120.0,
                   help="seconds a parameter-server request may take before it fails")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int, default=128,
                   help="images per step per process (the global batch is this x processes)")
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    g.add_argument("--lr-steps", type=float, nargs="*", default=[],
                   help="epochs (may be fractional) at which the learning rate is multiplied "
                        "by --gamma")
    g.add_argument("--gamma", type=float, default=0.1, help="learning-rate decay factor")
    g.add_argument("--warmup-steps", type=_nonneg_int, default=0,
                   help="linear learning-rate warm-up over this many steps")
    g.add_argument("--momentum", type=_nonneg_float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=_nonneg_float, default=5e-4, help="SGD weight decay")
    g.add_argument("--epochs", type=_positive_int, default=20, help="epochs to train")
    g.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after this many steps (overrides --epochs)")

    g = p.add_argument_group("output")
    g.add_argument("--save-path", default=None,
                   help=f"folder for checkpoints, logs, metrics.csv and TensorBoard events "
                        f"(default {DEFAULT_SAVE_PATH}; with --resume, the folder holding the "
                        "checkpoint). One trainer at a time: a lock in it refuses a second")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="checkpoint file, or a --save-path folder (its last.pth), to continue "
                        "from; the model and training settings come from the checkpoint, the "
                        "runtime ones (--save-path, --ps, --device, --workers, --amp, ...) "
                        "from this command line")
    g.add_argument("--save-every", type=_nonneg_int, default=0,
                   help="write a checkpoint every this many steps (0: at the end of each "
                        "epoch); one is always written when training ends")
    g.add_argument("--val-every", type=_nonneg_int, default=0,
                   help="verify on --val-bins every this many steps (0: each epoch end)")
    g.add_argument("--print-freq", type=_positive_int, default=20,
                   help="log a progress line every this many steps")

    _add_workflow_arguments(p)

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--amp", type=_amp_mode, nargs="?", const="bf16", default="off",
                   metavar="{off,bf16,fp16}",
                   help="autocast for the backbone: bf16 (where the GPU has it natively; "
                        "--amp alone), or fp16 with a loss scaler (the head and the row "
                        "gradients pushed to the row store stay float32 and unscaled)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order and flips")
    g.add_argument("--dist-backend", choices=("nccl", "gloo"), default=None,
                   help="torch.distributed backend under torchrun (default: nccl on CUDA, "
                        "gloo on CPU)")
    g.add_argument("--threads", type=_nonneg_int, default=0,
                   help="torch CPU threads per process (0: torch's default)")
    add_recipe_arguments(p)
    return p


def _add_workflow_arguments(p: argparse.ArgumentParser) -> None:
    """Around training: pretrained weights, held-out top-1, image folders
    (``docs/workflow.md``)."""
    g = p.add_argument_group("workflow (pretrained weights, held-out top-1, image folders)")
    g.add_argument("--train-folder", metavar="DIR", default=None,
                   help="training images as DIR/<class>/<image> (classes sorted: by number "
                        "where every class name is a number, else by name; label i = the "
                        "i-th class); instead of --train-rec / --train-filelist")
    g.add_argument("--init-from", metavar="PATH", default=None,
                   help="start a new run from these backbone weights only: a checkpoint of "
                        "this project, a plain state_dict, or arcface_torch's IResNet / "
                        "MobileFaceNet backbone.pth (keys renamed, see "
                        "hfsoftmax/models/keymap.py); the classifier starts fresh. Not "
                        "--resume: never restored from a checkpoint, and refused with it")
    g.add_argument("--init-strict", type=_bool, default=True, metavar="BOOL",
                   help="with --init-from: an error if any key is missing, unexpected or of "
                        "another shape (each named); false: load what fits, log the rest")
    g.add_argument("--init-rows", metavar="FILE", default=None,
                   help="start a new run's classifier from these rows: a .npy or "
                        ".safetensors matrix (num_classes x embedding_size, float32) as "
                        "`python -m paramserver.export` writes it; not restored on --resume")
    g.add_argument("--freeze-backbone-steps", type=_nonneg_int, default=0, metavar="N",
                   help="keep the backbone's weights and BatchNorm statistics fixed for the "
                        "first N steps (the classifier trains alone), e.g. after --init-from")
    g.add_argument("--val-filelist", metavar="FILE", default=None,
                   help="held-out images of the *training* identities ('relative/path "
                        "label' lines): their closed-set top-1 against the current classifier "
                        "rows is logged when verification runs (--val-every)")
    g.add_argument("--val-prefix", metavar="DIR", default=None,
                   help="folder the --val-filelist paths are relative to (default: the list "
                        "file's folder)")
    g.add_argument("--val-rec", metavar="PATH", default=None,
                   help="held-out images as RecordIO: an InsightFace folder (its train.rec) or "
                        "a .rec file with its .idx beside it (the synthetic set's "
                        "heldout.rec); as --val-filelist")
