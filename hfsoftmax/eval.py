"""Face verification of a trained backbone on InsightFace ``.bin`` pair sets.

Embeddings are extracted with :mod:`hfsoftmax.extract` (image + horizontal flip, summed,
L2-normalised) and scored by :mod:`evaluation` (InsightFace's protocol: 10-fold accuracy,
VAL@FAR=1e-3, ROC). The trainer calls :func:`evaluate_model` for periodic verification:

>>> sets = [load_verification_set(p) for p in ["data/lfw.bin"]]    # decode once
>>> results = evaluate_model(model, sets)          # {"lfw": VerificationResult}
>>> results["lfw"].accuracy

Command line (``scripts/eval.sh`` wraps it)::

    python -m hfsoftmax.eval --load-path ckpt.pth --bins lfw.bin cfp_fp.bin --out-dir out
    python -m hfsoftmax.eval --load-path ckpt.pth --data-dir datasets/faces_emore

prints a table (name, pairs, accuracy mean ± std over the folds, VAL@FAR, achieved FAR, best
threshold) and writes ``<name>.json`` and ``<name>_roc.png`` per set plus ``summary.json``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch.nn as nn

from evaluation import VerificationResult, evaluate, format_table, write_report

from .extract import (USER_ERRORS, VerificationSet, add_model_args, extract_verification,
                      issame_path, load_backbone, load_verification_set, resolve_device,
                      save_npy)
from .fileio import write_json

logger = logging.getLogger(__name__)

__all__ = ["KNOWN_BINS", "find_bins", "evaluate_model", "main"]

#: The verification sets ``--data-dir`` / ``scripts/eval.sh`` look for, in table order
#: (InsightFace's names; ``synthetic`` is the built-in synthetic set's pairs).
KNOWN_BINS = ("lfw", "cfp_ff", "cfp_fp", "agedb_30", "calfw", "cplfw", "synthetic")


def find_bins(data_dir: str | os.PathLike) -> list[Path]:
    """The known ``<name>.bin`` files present in ``data_dir``, in :data:`KNOWN_BINS` order."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {d}")
    return [d / f"{n}.bin" for n in KNOWN_BINS if (d / f"{n}.bin").is_file()]


def _as_sets(bins) -> list[VerificationSet | Path]:
    items, names = [], set()
    for b in bins:
        name = b.name if isinstance(b, VerificationSet) else Path(b).stem
        if name in names:
            raise ValueError(f"two verification sets are named {name!r}; names come from the "
                             "file names and must be unique")
        names.add(name)
        items.append(b if isinstance(b, VerificationSet) else Path(b))
    if not items:
        raise ValueError("no verification sets given")
    return items


def evaluate_model(model: nn.Module, bins: Sequence[str | os.PathLike | VerificationSet], *,
                   batch_size: int = 64, flip: bool = True, device=None,
                   num_folds: int = 10, far_target: float = 1e-3,
                   out_dir: str | os.PathLike | None = None, save_features: bool = False,
                   progress: bool = False, report_extra: dict | None = None
                   ) -> dict[str, VerificationResult]:
    """Verify ``model`` on each set; return ``{name: VerificationResult}`` in input order.

    ``bins`` are ``.bin`` paths (decoded on each call) or sets from
    :func:`~hfsoftmax.extract.load_verification_set` (decode once, evaluate often). The
    model's train/eval mode is restored afterwards. With ``out_dir`` the JSON report and ROC
    PNG of each set are written there (``report_extra`` keys are added to each JSON, e.g.
    the step); ``save_features`` also writes ``<name>.npy`` and ``<name>_issame.npy``.
    """
    results: dict[str, VerificationResult] = {}
    for item in _as_sets(bins):
        vset = item if isinstance(item, VerificationSet) else load_verification_set(item)
        feats, issame = extract_verification(model, vset, batch_size=batch_size, flip=flip,
                                             device=device, progress=progress)
        result = evaluate(feats, issame, num_folds=num_folds, far_target=far_target)
        results[vset.name] = result
        logger.info("[%s] accuracy-flip %.5f +- %.5f, VAL@FAR=%g %.5f", vset.name,
                    result.accuracy, result.accuracy_std, far_target, result.val)
        if out_dir is not None:
            write_report(result, out_dir, vset.name, bin=vset.path, flip=flip,
                         **(report_extra or {}))
            if save_features:
                feats_path = save_npy(Path(out_dir) / f"{vset.name}.npy", feats)
                save_npy(issame_path(feats_path), issame)
    return results


def summary(results: dict[str, VerificationResult]) -> dict[str, dict]:
    """The headline numbers of each set (no curves), for ``summary.json`` and logs."""
    keys = ("num_pairs", "accuracy", "accuracy_std", "val", "val_std", "far", "far_target",
            "best_threshold", "auc")
    return {name: {k: getattr(r, k) for k in keys} for name, r in results.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hfsoftmax.eval",
        description="Face verification (InsightFace protocol) of one checkpoint on .bin pair "
                    "sets: prints a table, writes JSON reports and ROC plots.")
    add_model_args(p)
    p.add_argument("--bins", nargs="+", default=[], metavar="BIN",
                   help="verification .bin files (lfw.bin, cfp_fp.bin, ...)")
    p.add_argument("--data-dir", default=None,
                   help=f"also evaluate every known .bin present here ({', '.join(KNOWN_BINS)})")
    p.add_argument("--out-dir", default=None,
                   help="where reports go (default: <checkpoint folder>/verification)")
    p.add_argument("--folds", type=int, default=10, help="cross-validation folds (default 10)")
    p.add_argument("--far", type=float, default=1e-3, help="FAR target of VAL (default 1e-3)")
    p.add_argument("--save-features", action="store_true",
                   help="also write <name>.npy features and <name>_issame.npy to --out-dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``hfsoftmax-eval``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        bins = [Path(b) for b in args.bins]
        if args.data_dir is not None:
            found = find_bins(args.data_dir)
            if not found and not bins:
                raise FileNotFoundError(
                    f"no verification .bin in {args.data_dir}; expected any of "
                    f"{', '.join(n + '.bin' for n in KNOWN_BINS)}")
            bins += [b for b in found if b not in bins]
        if not bins:
            raise ValueError("nothing to evaluate: give --bins and/or --data-dir")
        for b in bins:
            if not b.is_file():
                raise FileNotFoundError(f"verification file not found: {b}")
        out_dir = Path(args.out_dir) if args.out_dir else \
            Path(args.load_path).resolve().parent / "verification"
        device = resolve_device(args.device)
        model = load_backbone(args.load_path, device, arch=args.arch,
                              embedding_size=args.embedding_size)
        results = evaluate_model(model, bins, batch_size=args.batch_size, flip=args.flip,
                                 device=device, num_folds=args.folds, far_target=args.far,
                                 out_dir=out_dir, save_features=args.save_features,
                                 progress=args.progress,
                                 report_extra={"checkpoint": str(args.load_path)})
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    payload = {"checkpoint": str(args.load_path), "flip": args.flip, "results": summary(results)}
    write_json(out_dir / "summary.json", payload, indent=2)
    print(format_table(results))
    print(f"reports: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
