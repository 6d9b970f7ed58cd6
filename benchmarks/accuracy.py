"""Accuracy of HF-Softmax vs full softmax vs random class sampling, same backbone, steps, seed.

Each method is the trainer run with its own configuration files (``benchmarks/configs``,
the trainer's ``--config`` format): the recipe shared by every method
(``recipe_3ep.yaml``: network, head, batch, LR schedule, epochs), then the method's file:

- ``full`` (``full.yaml``): the full softmax;
- ``annoy`` / ``faiss`` / ``hnsw`` / ``exact`` (``hf_<name>.yaml``): HF-Softmax, the batch's
  labels plus the nearest classes by that index, the sampled head's rule at the trainer's
  defaults;
- ``random`` (``random.yaml``): uniformly random negatives (Partial FC's rule).

This script declares no trainer flag: it prepares the data set, passes the trainer the
files, the data, the seed and the sampled methods' ``--sample-num`` (``--sample-rate`` of
the set's classes), evaluates each checkpoint (``accuracy_eval.py``: verification per kind of
pair, closed-set top-1, geometry) and compares the methods (``accuracy_report.py``: paired
differences with standard errors). ``--trainer-args`` appends flags to every run (an
ablation), recorded with the results, as is every run's resolved settings (its args.json).

    python benchmarks/accuracy.py                                  # synthetic set, 20K classes
    python benchmarks/accuracy.py --quick                          # tiny smoke run (tests)
    python benchmarks/accuracy.py --methods full,annoy --trainer-args="--scale 64"

Prints one JSON object and writes it to ``--out`` (atomically, after every finished method;
``--resume`` skips the methods already in ``--out`` for the same configuration). Two
methods can train side by side on 2 cores and be combined afterwards:

    python benchmarks/accuracy.py --methods full,annoy --out a.json --work-dir runs/a &
    python benchmarks/accuracy.py --methods random,faiss --out b.json --work-dir runs/b
    python benchmarks/accuracy.py --merge a.json b.json --out accuracy.json

``--eval-only`` scores the checkpoints of ``--out`` again, e.g. on more pairs (``--pairs``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from accuracy_eval import evaluate_one, heldout_subset, set_info  # noqa: E402
from accuracy_report import comparisons, config_diff, markdown_table, merge_outputs  # noqa: E402

log = logging.getLogger("accuracy")

CONFIGS = ROOT / "benchmarks" / "configs"
METHODS = {"full": "full.yaml", "annoy": "hf_annoy.yaml", "faiss": "hf_faiss.yaml",
           "hnsw": "hf_hnsw.yaml", "exact": "hf_exact.yaml", "random": "random.yaml"}
#: the data sets (hfsoftmax.data.accuracy_set: one layout and metadata for all) and their
#: sizes: the synthetic set of issue 6 (>= 20K identities in families of 10 look-alikes, 4
#: training images each, 20,000 verification pairs: the standard error of an accuracy near
#: 88 % is then 0.23 points); its long-tailed variant (class sizes P(k) ~ k^-2 on [2, 50]);
#: rendered Hangul syllables (look-alikes share two of three jamo; 5,000 x 8 images: at
#: 10,000 x 4 the full softmax did not learn in 3 epochs, loss 33 -> 15, top-1 0); --quick: a tiny
#: synthetic set for the tests. Sizes are the generators' flags.
SETS = {"synthetic": dict(num_classes=20000, images_per_class=4, heldout_per_class=1,
                          pairs=20000, family_size=10),
        "longtail": dict(num_classes=10000, max_images=50, heldout_per_class=1, pairs=8000,
                         family_size=10),
        "hangul": dict(num_classes=5000, images_per_class=8, heldout_per_class=1,
                       pairs=8000),
        "quick": dict(num_classes=60, images_per_class=2, heldout_per_class=1, pairs=40,
                      family_size=5)}
#: settings of the evaluation only: --eval-only may change them
EVAL_KEYS = ("pairs", "top1_images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train full softmax, HF-Softmax and random class sampling with the "
                    "trainer's configs (benchmarks/configs) on one data set; report "
                    "verification per kind of pair, closed-set top-1 and paired differences "
                    "as one JSON object.")
    p.add_argument("--quick", action="store_true",
                   help="tiny set, 6 steps, configs/quick.yaml after the method's (smoke test)")
    p.add_argument("--dataset", choices=("synthetic", "longtail", "hangul"),
                   default="synthetic",
                   help="the data set (prepared once under datasets/data, reused after)")
    p.add_argument("--pairs", type=int, default=None,
                   help="verification pairs (default: the set's; an evaluation setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the set and of training")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of training only (default --seed): repeats a run on the same "
                        "set and pairs, to measure training-run noise")
    p.add_argument("--methods", default="full,annoy,random,faiss",
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--recipe", default=str(CONFIGS / "recipe_3ep.yaml"),
                   help="the trainer config every method shares")
    p.add_argument("--sample-rate", default=None,
                   help="the sampled methods' --sample-num as a share of the set's classes "
                        "(default 0.01; --quick 0.5), or 'min': the batch size, the least a "
                        "batch's own labels need")
    p.add_argument("--trainer-args", default="",
                   help="flags appended to every trainer run (quoted), e.g. '--scale 64'")
    p.add_argument("--top1-images", type=int, default=0,
                   help="held-out images scored for top-1 (0: all)")
    p.add_argument("--work-dir", default="runs/bench_accuracy",
                   help="folder of the runs' checkpoints and logs")
    p.add_argument("--out", default=None, help="JSON file to write (also printed)")
    p.add_argument("--eval-only", action="store_true",
                   help="re-evaluate the runs already in --out (no training)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="combine outputs of the same configuration into --out")
    p.add_argument("--table", nargs="+", metavar="JSON", default=None,
                   help="print the outputs' per-set table (Markdown) and exit")
    p.add_argument("--resume", action="store_true",
                   help="skip the methods already measured in --out for this configuration")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse and check the flags; errors name the fix (exit code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        parser.error(f"--methods: unknown {bad or 'none given'}; valid: {', '.join(METHODS)}")
    args.size = dict(SETS["quick" if args.quick else args.dataset])
    if args.pairs is not None:
        if args.pairs < 20 or args.pairs % 4:
            parser.error(f"--pairs must be a multiple of 4 and >= 20 (10 folds), got "
                         f"{args.pairs}")
        args.size["pairs"] = args.pairs
    rate = args.sample_rate or ("0.5" if args.quick else "0.01")
    try:
        args.sample_rate = rate if rate == "min" else float(rate)
    except ValueError:
        parser.error(f"--sample-rate must be a number in (0, 1] or 'min', got {rate!r}")
    if rate != "min" and not 0 < args.sample_rate <= 1:
        parser.error(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    if args.train_seed is None:
        args.train_seed = args.seed
    # the recipe, the method's file, then (--quick) the tiny overrides
    args.configs = [args.recipe] + ([str(CONFIGS / "quick.yaml")] if args.quick else [])
    args.trainer_args = shlex.split(args.trainer_args)
    base = Path(args.work_dir) if args.quick else ROOT / "datasets" / "data"
    s = args.size
    per = s.get("images_per_class", s.get("max_images"))
    args.data = str(base / f"{args.dataset}_{s['num_classes']}c_{per}i_s{args.seed}")
    return args


# --------------------------------------------------------------------------- data
def prepare_data(args) -> dict:
    """Prepare (or reuse) the set through its prepare entry point
    (``datasets/prepare_<set>.py``'s, with the sizes of :data:`SETS`)."""
    from hfsoftmax.data.accuracy_set import prepare_set

    argv = ["--out", args.data, "--seed", str(args.seed), "--no-progress"]
    for key, value in args.size.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its JSON line must not mix with ours
        meta = prepare_set("synthetic" if args.quick else args.dataset, argv)
    meta = {k: v for k, v in meta.items() if k != "class_family"}
    meta["prepare_s"] = round(time.perf_counter() - t0, 1)
    return meta


# --------------------------------------------------------------------------- training
def _yaml(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def sample_num(args, batch_size: int) -> int:
    """The sampled methods' ``--sample-num``: ``--sample-rate`` of the set's classes (at
    least the batch: its own labels must fit), or the batch size for ``min``."""
    c = args.size["num_classes"]
    if args.sample_rate == "min":
        return min(batch_size, c)
    return min(c, max(batch_size, int(round(args.sample_rate * c))))


def trainer_argv(args, method: str, save_path: str) -> list[str]:
    """The trainer's command line for one run: the configs, then what this benchmark sets,
    then ``--trainer-args``."""
    from hfsoftmax.engine.config import parse_args

    method_cfg = str(CONFIGS / METHODS[method])
    argv = ["--config", args.configs[0], method_cfg, *args.configs[1:], "--train-rec", args.data,
            "--seed", str(args.train_seed), "--save-path", save_path]
    if _yaml(method_cfg).get("sampled"):
        batch = parse_args(argv + args.trainer_args).batch_size
        argv += ["--sample-num", str(sample_num(args, batch))]
    return argv + args.trainer_args


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _last_metrics(save_path: str) -> dict:
    """Final train loss/acc and the mean selection recall from the trainer's metrics.csv."""
    with open(os.path.join(save_path, "metrics.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    last = rows[-1]
    out = {"final_loss": float(last["loss"]), "final_train_acc": float(last["acc"]),
           "final_step": int(last["step"])}
    for key, name in (("recall", "recall_at10"), ("coverage", "coverage"),
                      ("picks_top1pct", "picks_top1pct"), ("top1_all", "train_top1_all")):
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if vals:  # the mean over the run (recall: every --recall-every; coverage: each epoch)
            out[f"{name}_mean"] = round(float(np.mean(vals)), 4)
            out[f"{name}_last"] = vals[-1]
    return out


def train_one(args, method: str) -> dict:
    """Train one method with the trainer; returns its figures (or its error)."""
    from hfsoftmax.engine.config import parse_args
    from hfsoftmax.engine.runtime import remove_handlers, setup_logging
    from hfsoftmax.train import run

    save_path = os.path.join(args.work_dir, method)
    if os.path.isdir(save_path):  # this benchmark's own folder: a fresh run every time
        shutil.rmtree(save_path)
    os.makedirs(save_path)
    argv = trainer_argv(args, method, save_path)
    targs = parse_args(argv)
    handlers = setup_logging(save_path, 0)
    # keep the trainer's train.log; the benchmark's own console handler already prints
    remove_handlers([h for h in handlers if not isinstance(h, logging.FileHandler)])
    handlers = [h for h in handlers if isinstance(h, logging.FileHandler)]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    res: dict = {"method": method, "trainer_argv": argv}
    try:
        summary = run(targs)
        res["train_wall_s"] = round(summary["seconds"], 1)
        res["checkpoint"] = summary["checkpoint"]
        with open(os.path.join(save_path, "args.json"), encoding="utf-8") as f:
            res["settings"] = json.load(f)
    except (FloatingPointError, RuntimeError, ValueError) as e:
        log.error("%s failed: %s", method, e)
        res["error"] = f"{type(e).__name__}: {e}"
        res["train_wall_s"] = round(time.perf_counter() - t0, 1)
    finally:
        remove_handlers(handlers)
    res["train_cpu_s"] = round(_cpu_seconds() - cpu0, 1)
    with contextlib.suppress(OSError):
        res.update(_last_metrics(save_path))
    return res


# --------------------------------------------------------------------------- report
def config_of(args) -> dict:
    """What every run shares: the set, the configs (their contents), the sampled methods'
    size, the seeds and the extra trainer flags."""
    return {"dataset": args.dataset, "quick": args.quick, **args.size, "seed": args.seed,
            "train_seed": args.train_seed, "top1_images": args.top1_images,
            "configs": {os.path.relpath(p, ROOT): _yaml(p) for p in args.configs},
            "sample_rate": args.sample_rate, "trainer_args": args.trainer_args}


def code_of() -> dict:
    """The git commit that measured (and whether the tree had local changes)."""
    out: dict = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                           capture_output=True, timeout=10).stdout.strip()
        out["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--", "hfsoftmax", "paramserver", "benchmarks"],
            cwd=ROOT, text=True, capture_output=True, timeout=10).stdout.strip())
    return out


def save(path: str | None, obj: dict) -> str:
    """Write ``obj`` (indent 2) to ``path`` atomically when one is given; return the text."""
    if path:
        from hfsoftmax.fileio import write_json

        return write_json(path, obj, indent=2)
    return json.dumps(obj, indent=2)


def _load_old(args, cfg: dict) -> tuple[dict, dict]:
    """``(old output, runs to keep)`` for --resume / --eval-only."""
    if args.eval_only and not (args.out and os.path.isfile(args.out)):
        raise SystemExit(f"--eval-only re-evaluates the runs in --out, but {args.out} does not "
                         "exist; run the benchmark first")
    if not ((args.resume or args.eval_only) and args.out and os.path.isfile(args.out)):
        return {}, {}
    with open(args.out, encoding="utf-8") as f:
        old = json.load(f)
    diff = config_diff(cfg, old.get("config", {}))
    if not diff or (args.eval_only and set(diff) <= set(EVAL_KEYS)):
        runs = {k: v for k, v in old.get("runs", {}).items() if "error" not in v}
        log.info("resuming: %s already measured%s", ", ".join(runs) or "nothing",
                 f" (re-evaluated with new {', '.join(diff)})" if diff else "")
        return old, runs
    if args.eval_only:
        raise SystemExit(f"--eval-only: {args.out} was measured with another configuration "
                         f"(differs in {', '.join(diff)}); give the same flags as that run "
                         f"(only {', '.join(EVAL_KEYS)} may change)")
    log.warning("--resume: %s was measured with another configuration; starting over",
                args.out)
    return old, {}


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = resolve_args(argv)
    if args.table:
        outs = []
        for path in args.table:
            with open(path, encoding="utf-8") as f:
                outs.append(json.load(f))
        print(markdown_table(outs))
        return {}
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out (the combined JSON to write)")
        result = merge_outputs(args.merge)
        print(save(args.out, result))
        return result
    os.makedirs(args.work_dir, exist_ok=True)
    t_all = time.perf_counter()
    data = prepare_data(args)
    cfg = config_of(args)
    old, runs = _load_old(args, cfg)
    info = set_info(args.data)
    indices = heldout_subset(info["num_classes"] * args.size["heldout_per_class"],
                             args.top1_images, args.seed)
    result = {"benchmark": "accuracy", "config": cfg, "dataset": data, "runs": runs,
              "code": code_of(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch": torch.__version__,
                          "loadavg_start": [round(x, 2) for x in os.getloadavg()]}}
    for method in args.methods:
        if args.eval_only:
            if method in runs:
                log.info("=== %s: re-evaluating %s", method, runs[method]["checkpoint"])
                evaluate_one(runs[method], info, args.data, runs[method]["settings"], indices)
            continue
        if method in runs:
            continue
        log.info("=== %s: training", method)
        res = train_one(args, method)
        if "error" not in res:
            evaluate_one(res, info, args.data, res["settings"], indices)
            log.info("=== %s: verification %.4f, top-1 %.4f, train %.0f s wall / %.0f s CPU",
                     method, res["verification"]["accuracy"], res["top1"],
                     res["train_wall_s"], res["train_cpu_s"])
        res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        runs[method] = res
        result["comparison"] = comparisons(runs)
        save(args.out, result)
    result["comparison"] = comparisons(runs)
    if args.eval_only:  # the training run's own figures stay; this pass is noted apart
        result.update(machine=old.get("machine", result["machine"]), eval_code=result["code"],
                      code=old.get("code"), total_wall_s=old.get("total_wall_s"),
                      eval_only_wall_s=round(time.perf_counter() - t_all, 1))
    else:
        result["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    print(save(args.out, result))
    return result


if __name__ == "__main__":
    main()
