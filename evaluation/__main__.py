"""Verification metrics of saved features, without torch.

    python -m evaluation lfw.npy [cfp_fp.npy ...] [--out-dir reports]

Each ``X.npy`` holds the features (2P, D) of a ``.bin`` (pair i = rows 2i, 2i+1), and
``X_issame.npy`` beside it the P pair labels: what ``python -m hfsoftmax.extract --bin``
and ``python -m hfsoftmax.eval --save-features`` write. Prints the table; with
``--out-dir`` writes ``X.json`` and ``X_roc.png``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .report import format_table, issame_path, write_report
from .verification import DEFAULT_FAR_TARGET, DEFAULT_FOLDS, evaluate


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n")[0])
    p.add_argument("features", nargs="+", help="features .npy (labels in <name>_issame.npy)")
    p.add_argument("--out-dir", default=None, help="write <name>.json and <name>_roc.png here")
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    p.add_argument("--far", type=float, default=DEFAULT_FAR_TARGET)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    results = {}
    try:
        for f in map(Path, args.features):
            labels = issame_path(f)
            for path in (f, labels):
                if not path.is_file():
                    raise FileNotFoundError(f"not found: {path} (features X.npy need their pair "
                                            "labels in X_issame.npy)")
            # allow_pickle=False: a .npy of objects would run code when loaded
            feats = np.load(f, allow_pickle=False)
            issame = np.load(labels, allow_pickle=False)
            name = f.name[:-4] if f.name.endswith(".npy") else f.name
            results[name] = evaluate(feats, issame, num_folds=args.folds, far_target=args.far)
            if args.out_dir:
                write_report(results[name], args.out_dir, name, features=str(f))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
