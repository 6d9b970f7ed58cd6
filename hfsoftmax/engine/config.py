"""The trainer's settings: every flag, its default and its help text, in this one place.

Precedence, lowest first: the defaults below < the ``args`` stored in the checkpoint given
to ``--resume`` < a YAML file given to ``--config`` (keys are flag names, with ``-`` or
``_``) < flags on the command line. ``--help`` is the documentation of every setting.

>>> args = parse_args(["--train-rec", "datasets/data/synthetic", "--sampled"])
>>> args.sampler, args.sample_num
('annoy', 1000)
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Sequence

__all__ = ["build_parser", "parse_args", "validate_args", "args_to_dict", "STRUCTURAL",
           "HEADS", "SAMPLERS"]

HEADS = ("linear", "cosface", "arcface")
SAMPLERS = ("annoy", "hnsw", "faiss", "exact", "random")
# Settings that shape the model or the classifier table: a resumed run must keep them.
STRUCTURAL = ("arch", "embedding_size", "head", "sampled", "num_classes")
# Fresh rows cost a (batch x D) x (D x rows) product per step on the CPU and rows x D floats
# in the trainer (measured in hfsoftmax/samplers/README.md); the automatic size (the rows
# one interval can change) is used up to this many rows. Beyond it fresh rows stay off
# unless --fresh-rows asks: a smaller store would fill within an interval and rebuild the
# index early, which a default should not do behind --interval.
FRESH_ROWS_AUTO_MAX = 32768


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def _unit_float(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {s}")
    return v


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="YAML", default=None,
                   help="YAML file of settings (keys: flag names); command-line flags override "
                        "it")

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
    g.add_argument("--workers", type=_nonneg_int, default=2,
                   help="data-loading worker processes per rank (0: load in the main process)")
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
                   help="margin heads' scale s (default: the head's, 64)")
    g.add_argument("--margin", type=float, default=None,
                   help="margin m (default: cosface 0.35, arcface 0.5 radians)")

    g = p.add_argument_group("HF-Softmax (sampled head)")
    g.add_argument("--sampled", action="store_true",
                   help="train with the sampled head: softmax over --sample-num selected "
                        "classes per batch instead of all")
    g.add_argument("--sampler", choices=SAMPLERS, default="annoy",
                   help="class selection: annoy (the paper's hashing forest), hnsw, faiss, "
                        "exact (brute force), random (Partial FC's uniform negatives)")
    g.add_argument("--sample-num", type=_positive_int, default=1000,
                   help="classes per batch softmax (the batch's labels + nearest + random)")
    g.add_argument("--interval", type=_positive_int, default=100,
                   help="rebuild the sampler's index every this many steps")
    g.add_argument("--ntrees", type=_positive_int, default=50,
                   help="annoy: trees in the forest")
    g.add_argument("--sampler-opt", type=_key_value, nargs="*", default=[],
                   metavar="KEY=VALUE",
                   help="backend options of the sampler's index, e.g. nprobe=32 (faiss), "
                        "search_k=5000 (annoy), ef=128 (hnsw); see hfsoftmax/samplers/README.md")
    g.add_argument("--renorm-rows", type=_nonneg_float, default=None,
                   help="margin heads: after each SGD step rescale the updated class rows to "
                        "this L2 norm (0: off; default 1 for cosface/arcface where the rows' "
                        "weight decay is lazy (--no-row-catchup-decay or a --row-momentum), "
                        "else off: they are capped, --max-norm-rows). Their logits ignore "
                        "row norms, but a row's effective step on its direction is lr/|w|^2, "
                        "and the sparse, lumpy updates of a sampled head inflate norms (see "
                        "benchmarks/ACCURACY.md)")
    g.add_argument("--max-norm-rows", type=_nonneg_float, default=None,
                   help="margin heads: after each SGD step scale the updated class rows whose "
                        "L2 norm exceeds this down to it, the others keep theirs (a cap, as "
                        "nn.Embedding's max_norm; 0: off). Default 1 for cosface/arcface "
                        "with --row-catchup-decay (which lets rows settle below the cap) "
                        "unless --renorm-rows is given, else off; given, --renorm-rows "
                        "defaults to off")
    g.add_argument("--row-momentum", type=_nonneg_float, default=None,
                   help="momentum of the sampled head's rows (default 0). Their SGD is lazy: "
                        "a row's momentum moves only when the row is pushed, so a gradient's "
                        "momentum tail would land hundreds of steps late; with 0 and the "
                        "default --row-lr-mult each row gradient gets its whole momentum-SGD "
                        "displacement at once. --row-momentum 0.9 (--momentum): the paper's "
                        "lazy momentum (see hfsoftmax/heads/README.md)")
    g.add_argument("--row-catchup-decay", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="decay every row every step by 1 - lr * --weight-decay, as a dense "
                        "SGD (the full softmax) does, kept lazily: a pushed row first gets "
                        "the decay of the steps it missed (needs --row-momentum 0; default "
                        "on for cosface/arcface where it can be, else off). Off: weight "
                        "decay acts on a row only in the steps it is pushed, too seldom to "
                        "hold its norm (see hfsoftmax/heads/README.md)")
    g.add_argument("--row-lr-mult", type=_positive_float, default=None,
                   help="the sampled head's rows take --lr (and its schedule) times this "
                        "(default (1 - row momentum) / (1 - --momentum): a row gradient moves "
                        "its row as far in all as momentum SGD would; 10 at the defaults)")
    g.add_argument("--fresh-rows", type=_nonneg_int, default=None,
                   help="keep up to this many rows changed since the last index rebuild and "
                        "search them exactly beside the index, so the selection does not go "
                        "stale between rebuilds (rebuilds early when full; 0: off; default "
                        "--interval x --sample-num for cosface/arcface with an index where "
                        f"that is at most {FRESH_ROWS_AUTO_MAX} rows, else off; off for "
                        "linear). Costs a (batch x D) x (D x rows) product per step on the CPU")
    g.add_argument("--random-share", type=_unit_float, default=0.0,
                   help="share (0 to 1) of the slots left after the batch's labels that go to "
                        "uniformly random classes; the nearest classes take the rest (0: the "
                        "paper's rule, neighbours first, random only to top up)")
    g.add_argument("--logq-correction", action=argparse.BooleanOptionalAction, default=False,
                   help="log-Q correction of the sampled softmax: add log(#classes not chosen "
                        "outright / #random classes) to the random classes' logits in the "
                        "loss, so they stand for every class left out and the normaliser is "
                        "an unbiased estimate of the full softmax's. Acts on random classes "
                        "only: use it with --random-share > 0 or --sampler random")
    g.add_argument("--logq-per-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="the log-Q correction per sample: only a sample's label and its own "
                        "nearest classes count as chosen for it; every other selected class "
                        "(the batch's other labels, the other samples' neighbours, random "
                        "ones) stands for log(#classes not chosen for it / #other selected) "
                        "classes. Needs no --random-share. Default: on for cosface/arcface "
                        "with an index sampler unless --logq-correction is given; off for "
                        "linear and --sampler random")
    g.add_argument("--background-rebuild", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="rebuild the index on a background thread (training queries the old "
                        "one meanwhile); --no-background-rebuild makes runs reproducible")
    g.add_argument("--sampler-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the ANN index in its own process, which reads the rows from the "
                        "parameter server itself, so the trainer never holds all rows or the "
                        "index (default: on with --ps, off without)")
    g.add_argument("--index-threads", type=_nonneg_int, default=0,
                   help="OpenMP/torch threads of the index process (--sampler-process); 1 "
                        "keeps a rebuild from competing with the trainer for cores (0: the "
                        "libraries' default, all cores)")
    g.add_argument("--recall-every", type=_nonneg_int, default=200,
                   help="every this many steps, log the fraction of the true top-10 classes "
                        "(exact search over all rows) that the selection contains (0: off)")
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
    g.add_argument("--save-path", default="runs/train",
                   help="folder for checkpoints, logs, metrics.csv and TensorBoard events")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="checkpoint file, or a --save-path folder (its last.pth), to continue "
                        "from; the model settings come from the checkpoint")
    g.add_argument("--save-every", type=_nonneg_int, default=0,
                   help="write a checkpoint every this many steps (0: at the end of each "
                        "epoch); one is always written when training ends")
    g.add_argument("--val-every", type=_nonneg_int, default=0,
                   help="verify on --val-bins every this many steps (0: each epoch end)")
    g.add_argument("--print-freq", type=_positive_int, default=20,
                   help="log a progress line every this many steps")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the backbone (no loss scaling, so the row "
                        "gradients pushed to the row store stay true gradients)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order and flips")
    g.add_argument("--dist-backend", choices=("nccl", "gloo"), default=None,
                   help="torch.distributed backend under torchrun (default: nccl on CUDA, "
                        "gloo on CPU)")
    g.add_argument("--threads", type=_nonneg_int, default=0,
                   help="torch CPU threads per process (0: torch's default)")
    return p


def _dest_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A YAML or checkpoint value converted as the flag's own parser would."""
    if value is None:
        return None
    conv: Callable | None = action.type
    try:
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if action.nargs in ("*", "+"):
            items = value if isinstance(value, (list, tuple)) else [value]
            return [conv(str(v)) if conv else v for v in items]
        if conv is _ps_addresses:
            return _ps_addresses(",".join(value) if isinstance(value, (list, tuple))
                                 else str(value))
        value = conv(str(value)) if conv else value
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"valid: {', '.join(map(str, action.choices))}")
        return value
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{source}: bad value {value!r} for {key}: {e}") from None


def _load_yaml(path: str, dests: dict[str, argparse.Action]) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got "
                         f"{type(data).__name__}")
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in dests or dest in ("config", "resume"):
            valid = ", ".join(sorted(d.replace("_", "-") for d in dests
                                     if d not in ("config", "resume")))
            raise ValueError(f"--config {path}: unknown setting {key!r}; valid: {valid}")
        out[dest] = _coerce(dests[dest], key, value, f"--config {path}")
    return out


def resolve_resume_path(path: str) -> str:
    """A checkpoint file, or a folder holding ``last.pth``."""
    if os.path.isdir(path):
        cand = os.path.join(path, "last.pth")
        if not os.path.isfile(cand):
            raise FileNotFoundError(f"--resume {path}: folder has no last.pth")
        return cand
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume checkpoint not found: {path}")
    return path


def _stored_args(resume: str, dests: dict[str, argparse.Action]) -> dict[str, Any]:
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(resolve_resume_path(resume))
    stored = ckpt.get("args") or {}
    if stored.get("sampled"):
        # settings a checkpoint may predate, at the values it was trained with: the rows took
        # the backbone's momentum and LR; renormed, capped, every-step-decayed and fresh rows
        # and the per-sample log-Q correction were off
        stored = {"row_momentum": stored.get("momentum", 0.9), "row_lr_mult": 1.0,
                  "renorm_rows": 0.0, "max_norm_rows": 0.0, "row_catchup_decay": False,
                  "fresh_rows": 0, "logq_per_sample": False, **stored}
    return {k: v for k, v in stored.items() if k in dests and k not in ("config", "resume")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags with the precedence of the module docstring, then validate them."""
    parser = build_parser()
    dests = _dest_names(parser)
    first, _ = parser.parse_known_args(argv)
    layered: dict[str, Any] = {}
    stored: dict[str, Any] = {}
    if first.resume:
        stored = _stored_args(first.resume, dests)
        layered.update(stored)
    if first.config:
        layered.update(_load_yaml(first.config, dests))
    parser.set_defaults(**layered)
    args = parser.parse_args(argv)
    if stored:
        for key in STRUCTURAL:
            if key in stored and getattr(args, key) != stored[key]:
                raise ValueError(
                    f"--resume {first.resume}: the checkpoint was trained with "
                    f"--{key.replace('_', '-')}={stored[key]!r} but this run asks for "
                    f"{getattr(args, key)!r}; drop the flag, or start a new run without "
                    "--resume")
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the first bad or inconsistent setting and the fix."""
    if args.train_rec and args.train_filelist:
        raise ValueError("give --train-rec or --train-filelist, not both")
    if not args.train_rec and not args.train_filelist:
        raise ValueError("no training data: give --train-rec DIR (InsightFace .rec folder) or "
                         "--train-filelist FILE --train-prefix DIR")
    if not args.resume and os.path.isfile(os.path.join(args.save_path, "last.pth")):
        raise ValueError(f"--save-path {args.save_path} already holds a run (last.pth); "
                         f"continue it with --resume {args.save_path}, or pick a new "
                         "--save-path")
    missing = [b for b in args.val_bins if not os.path.isfile(b)]
    if missing:
        raise FileNotFoundError(f"--val-bins file(s) not found: {', '.join(missing)}")
    from ..models import list_backbones

    if args.arch not in list_backbones():
        raise ValueError(f"unknown --arch {args.arch!r}; valid: {', '.join(list_backbones())}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if not math.isfinite(args.gamma) or not 0 < args.gamma <= 1:
        raise ValueError(f"--gamma must be in (0, 1], got {args.gamma}")
    steps = list(args.lr_steps)
    if any(not math.isfinite(s) or s <= 0 for s in steps) or steps != sorted(steps):
        raise ValueError(f"--lr-steps must be positive epochs in ascending order, got {steps}")
    if args.scale is not None and (not math.isfinite(args.scale) or args.scale <= 0):
        raise ValueError(f"--scale must be a finite number > 0, got {args.scale}")
    if args.margin is not None and not math.isfinite(args.margin):
        raise ValueError(f"--margin must be a finite number, got {args.margin}")
    if args.head == "linear" and args.margin not in (None, 0, 0.0):
        raise ValueError(f"--margin {args.margin} needs a margin head (--head cosface or "
                         "arcface); the linear head has none")
    if args.ps and not args.sampled:
        raise ValueError("--ps holds the sampled head's classifier rows; add --sampled (the "
                         "full softmax keeps its weight in the trainer)")
    if args.sampled and args.num_classes is not None and args.sample_num > args.num_classes:
        raise ValueError(f"--sample-num {args.sample_num} exceeds --num-classes "
                         f"{args.num_classes}; lower --sample-num")
    if args.ps_timeout <= 0:
        raise ValueError(f"--ps-timeout must be > 0 seconds, got {args.ps_timeout}")
    dev = args.device
    if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:")
                                                  and dev[5:].isdigit()):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The settings as a plain dict (str/int/float/bool/list/None) for checkpoints."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (str, int, float, bool, list)):
            out[k] = v
    return out
