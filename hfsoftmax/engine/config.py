"""The trainer's settings: every flag, its default and its help text, in this one place.

Precedence, lowest first: the defaults below < the ``args`` stored in the checkpoint given
to ``--resume`` < the YAML files given to ``--config``, in order (keys are flag names, with
``-`` or ``_``) < flags on the command line. ``--help`` is the documentation of every setting.

A checkpoint gives back what shapes and trains the model; never where the run writes, which
server it talks to or how this machine runs it (:data:`RUNTIME`: ``--save-path``, ``--ps``,
``--device``, ``--workers``, ...): those come from this command line, so a copied or edited
checkpoint cannot pick another run's folder or server. ``--resume`` without
``--save-path`` continues in the folder that holds the checkpoint.

The sampled head's rule (the rows' SGD, the selection's correction) is resolved once, by
:mod:`hfsoftmax.heads.sampled_config`, from ``--sampled-rule`` and the flags given.

Input errors raise :class:`UsageError` (the console entry prints one line, exit code 2).

>>> args = parse_args(["--train-rec", "datasets/data/synthetic", "--sampled"])
>>> args.sampler, args.sample_num
('annoy', 1000)
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Sequence

from ..heads import sampled_config
from .flags import (DEFAULT_SAVE_PATH, HEADS, RECIPE_RUNTIME, SAMPLERS, _ps_addresses,
                    build_parser, parse_key_values)

__all__ = ["build_parser", "parse_args", "validate_args", "args_to_dict", "STRUCTURAL",
           "RUNTIME", "START_ONLY", "HEADS", "SAMPLERS", "UsageError", "DEFAULT_SAVE_PATH",
           "parse_key_values", "resolve_resume_path"]

# Settings that shape the model or the classifier table: a resumed run must keep them.
STRUCTURAL = ("arch", "embedding_size", "head", "sampled", "num_classes")
# Where and how this process runs: never taken from a checkpoint (see the module doc).
RUNTIME = ("config", "resume", "save_path", "ps", "ps_timeout", "device", "amp", "workers",
           "threads", "dist_backend", "index_threads", "sampler_process", "print_freq",
           "row_store")
RUNTIME += RECIPE_RUNTIME  # the GPU recipe's (engine/flags.py)
# How a new run starts (``--init-from``, ``--init-rows``): never taken from a checkpoint, so
# a resumed run continues itself, not re-initialised from its source (engine/init_weights.py).
START_ONLY = ("init_from", "init_strict", "init_rows")
# Sampled-head settings without a meaning for the full softmax: an error there, not ignored.
SAMPLED_ONLY = ("sampler", "sample_num", *sampled_config.FIELDS)
SAMPLED_DEFAULTS = {"sampler": "annoy", "sample_num": 1000}


class UsageError(ValueError):
    """A setting or input the user can fix: the console entry prints it as one line and
    exits with code 2 (no traceback)."""


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
        raise UsageError(f"{source}: bad value {value!r} for {key}: {e}") from None


def _load_yaml(path: str, dests: dict[str, argparse.Action]) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"--config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # safe_load refuses !!python tags
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--config {path}: not a plain YAML mapping of settings ({first}); "
                         "write keys as flag names and plain values") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got "
                         f"{type(data).__name__}")
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in dests or dest in ("config", "resume"):
            valid = ", ".join(sorted(d.replace("_", "-") for d in dests
                                     if d not in ("config", "resume")))
            raise UsageError(f"--config {path}: unknown setting {key!r}; valid: {valid}")
        out[dest] = _coerce(dests[dest], key, value, f"--config {path}")
    return out


def resolve_resume_path(path: str) -> str:
    """A checkpoint file, or a folder holding ``last.pth``."""
    if os.path.isdir(path):
        cand = os.path.join(path, "last.pth")
        if not os.path.isfile(cand):
            raise UsageError(f"--resume {path}: folder has no last.pth")
        return cand
    if not os.path.isfile(path):
        raise UsageError(f"--resume checkpoint not found: {path}")
    return path


def _stored_args(resume: str, dests: dict[str, argparse.Action]) -> dict[str, Any]:
    """The settings a checkpoint gives back: its stored ``args`` less :data:`RUNTIME`, the
    sampled head's rule as explicit values (older checkpoints: the legacy table of
    :func:`~hfsoftmax.heads.sampled_config.legacy_rule`), every value checked as the flag's
    parser would."""
    from .checkpoint import load_checkpoint

    path = resolve_resume_path(resume)
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        raise UsageError(f"--resume {path}: {e}") from None
    stored = ckpt.get("args")
    if not isinstance(stored, dict):
        raise UsageError(f"--resume {path}: the checkpoint has no settings ('args'); it was "
                         "not written by hfsoftmax-train")
    if stored.get("head") in sampled_config.MARGIN_HEADS:
        # a margin head's scale and margin are stored resolved; None: a checkpoint from
        # before the backbones' own defaults, which ran at the heads' (64; 0.35 / 0.5)
        from ..heads.logits import DEFAULT_MARGINS, DEFAULT_SCALE
        if stored.get("scale") is None:
            stored = {**stored, "scale": DEFAULT_SCALE}
        if stored.get("margin") is None:
            stored = {**stored, "margin": DEFAULT_MARGINS[stored["head"]]}
    if stored.get("sampled"):
        stored = {**stored, **sampled_config.legacy_rule(stored)}
    else:
        stored = {k: v for k, v in stored.items() if k not in SAMPLED_ONLY}
    out = {}
    for key, value in stored.items():
        if key in dests and key not in RUNTIME and key not in START_ONLY:
            out[key] = _coerce(dests[key], key, value, f"--resume {path}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags with the precedence of the module docstring, then validate them.
    ``--help`` shows the defaults as the checkpoint and YAML files given leave them
    (``--config configs/x.yaml --help``: the preset's effective values)."""
    parser = build_parser()
    dests = _dest_names(parser)
    pre = argparse.ArgumentParser(add_help=False)  # --config/--resume only, --help later
    pre.add_argument("--config", nargs="+", default=None)
    pre.add_argument("--resume", default=None)
    first, _ = pre.parse_known_args(argv)
    layered: dict[str, Any] = {}
    stored: dict[str, Any] = {}
    if first.resume:
        stored = _stored_args(first.resume, dests)
        layered.update(stored)
    for path in first.config or ():
        layered.update(_load_yaml(path, dests))
    parser.set_defaults(**layered)
    args = parser.parse_args(argv)
    if stored:
        for key in STRUCTURAL:
            if key in stored and getattr(args, key) != stored[key]:
                raise UsageError(
                    f"--resume {first.resume}: the checkpoint was trained with "
                    f"--{key.replace('_', '-')}={stored[key]!r} but this run asks for "
                    f"{getattr(args, key)!r}; drop the flag, or start a new run without "
                    "--resume")
    if args.save_path is None:
        args.save_path = (os.path.dirname(os.path.abspath(resolve_resume_path(args.resume)))
                          if args.resume else DEFAULT_SAVE_PATH)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise :class:`UsageError` naming the first bad or inconsistent setting and the fix;
    fill the sampled head's defaults (``--sampler``, ``--sample-num``) where it is on."""
    sources = [f for f in ("train_rec", "train_filelist", "train_folder") if getattr(args, f)]
    if len(sources) > 1:
        raise UsageError(f"give one of --train-rec, --train-filelist, --train-folder, not "
                         f"{'both' if len(sources) == 2 else 'all three'} "
                         f"({' and '.join('--' + f.replace('_', '-') for f in sources)})")
    if not sources:
        raise UsageError("no training data: give --train-rec DIR (InsightFace .rec folder), "
                         "--train-filelist FILE --train-prefix DIR, or --train-folder DIR "
                         "(DIR/<class>/<image>)")
    from .workflow_args import validate_workflow_args

    validate_workflow_args(args)
    if os.path.exists(args.save_path) and not os.path.isdir(args.save_path):
        raise UsageError(f"--save-path {args.save_path} is a file, not a folder; pick a "
                         "folder for the run's outputs")
    if not args.resume and os.path.isfile(os.path.join(args.save_path, "last.pth")):
        raise UsageError(f"--save-path {args.save_path} already holds a run (last.pth); "
                         f"continue it with --resume {args.save_path}, or pick a new "
                         "--save-path")
    missing = [b for b in args.val_bins if not os.path.isfile(b)]
    if missing:
        raise UsageError(f"--val-bins file(s) not found: {', '.join(missing)}")
    from ..models import list_backbones

    if args.arch not in list_backbones():
        raise UsageError(f"unknown --arch {args.arch!r}; valid: {', '.join(list_backbones())}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if not math.isfinite(args.gamma) or not 0 < args.gamma <= 1:
        raise UsageError(f"--gamma must be in (0, 1], got {args.gamma}")
    steps = list(args.lr_steps)
    if any(not math.isfinite(s) or s <= 0 for s in steps) or steps != sorted(steps):
        raise UsageError(f"--lr-steps must be positive epochs in ascending order, got {steps}")
    if args.scale is not None and (not math.isfinite(args.scale) or args.scale <= 0):
        raise UsageError(f"--scale must be a finite number > 0, got {args.scale}")
    if args.margin is not None and not math.isfinite(args.margin):
        raise UsageError(f"--margin must be a finite number, got {args.margin}")
    if args.head == "linear" and args.margin not in (None, 0, 0.0):
        raise UsageError(f"--margin {args.margin} needs a margin head (--head cosface or "
                         "arcface); the linear head has none")
    _validate_sampled(args)
    if args.ps_timeout <= 0 or not math.isfinite(args.ps_timeout):
        raise UsageError(f"--ps-timeout must be a finite number of seconds > 0, got "
                         f"{args.ps_timeout}")
    dev = args.device
    if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:")
                                                  and dev[5:].isdigit()):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    from .recipe import validate_recipe

    validate_recipe(args)


def _gpu_run(device: str) -> bool:
    """Whether ``--device`` puts this run on a GPU (``auto`` on a CUDA machine)."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def _validate_sampled(args: argparse.Namespace) -> None:
    """The sampled head's flags: refused without ``--sampled`` (never silently ignored),
    defaults filled and the rule resolved once with it (its errors name the fix)."""
    if not args.sampled:
        given = [k for k in SAMPLED_ONLY if getattr(args, k, None) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} {getattr(args, given[0])} applies to the sampled head "
                             "(the full softmax has all classes in every batch and its rows "
                             "are torch parameters trained with --lr and --momentum); add "
                             "--sampled or drop it")
        if args.ps:
            raise UsageError("--ps holds the sampled head's classifier rows; add --sampled "
                             "(the full softmax keeps its weight in the trainer)")
        if args.row_store != "auto":
            raise UsageError(f"--row-store {args.row_store} holds the sampled head's rows; add "
                             "--sampled (the full softmax keeps its weight in the trainer)")
        return
    _validate_row_store(args)
    for key, value in SAMPLED_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            # selection where the features are (the sharded rows: over each rank's shard)
            if key == "sampler" and (_gpu_run(args.device) or args.row_store == "dist"):
                args.sampler = "device"
    if args.num_classes is not None and args.sample_num > args.num_classes:
        raise UsageError(f"--sample-num {args.sample_num} exceeds --num-classes "
                         f"{args.num_classes}; lower --sample-num")
    try:
        sampled_config.rule_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


#: the samplers the sharded rows select with (an exact top-k over each rank's shard)
DIST_SAMPLERS = ("device", "exact", "random")


def _validate_row_store(args: argparse.Namespace) -> None:
    """``--row-store`` against ``--ps`` and the sampler (``--sampled`` is on)."""
    rs = args.row_store
    if rs == "server" and not args.ps:
        raise UsageError("--row-store server needs the parameter server's address: add --ps "
                         "tcp://HOST:PORT (or use --row-store local or dist)")
    if rs in ("local", "dist") and args.ps:
        raise UsageError(f"--row-store {rs} keeps the rows in the trainer, but --ps "
                         f"{','.join(args.ps)} names a parameter server; drop --ps, or use "
                         "--row-store server")
    if rs != "dist":
        return
    if args.sampler is not None and args.sampler not in DIST_SAMPLERS:
        raise UsageError(f"--sampler {args.sampler} searches an index over all rows; with "
                         "--row-store dist each rank holds a shard and the nearest classes "
                         "are an exact top-k merged over the ranks: use --sampler device "
                         "(or exact, the same here) or random, or --row-store local/server")
    if args.sampler_process:
        raise UsageError("--sampler-process runs an index over all rows in its own process; "
                         "--row-store dist has no index (each rank searches its shard): drop "
                         "--sampler-process")


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The settings as a plain dict (str/int/float/bool/list/None) for checkpoints."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (str, int, float, bool, list)):
            out[k] = v
    return out
