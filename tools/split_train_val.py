#!/usr/bin/env python
"""Split an existing image list (``relative/path label`` lines) into train and val lists.

    python tools/split_train_val.py --list images/all.lst --val-ratio 0.05 \
        --train-out images/train.lst --val-out images/val.lst

Per class and deterministic, the same rule as ``tools/rec2img.py``: within each class the
images are ordered by a seeded hash of their path and the first ``round(val_ratio * n)`` go
to val (at most n-1, so every class keeps a training image). The result depends only on the
seed and the set of paths, not on the order of the lines; both outputs keep the input order.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

if __package__ in (None, ""):  # run as `python tools/split_train_val.py` from a checkout
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _root not in sys.path:
        sys.path.insert(0, _root)

from hfsoftmax.data.filelist import read_list, split_train_val, write_list  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", required=True, help="input list of 'relative/path label' lines")
    ap.add_argument("--val-ratio", type=float, required=True, help="fraction per class, [0, 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-out", default=None, help="default: <list folder>/train.lst")
    ap.add_argument("--val-out", default=None, help="default: <list folder>/val.lst")
    args = ap.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.list))
    train_out = args.train_out or os.path.join(folder, "train.lst")
    val_out = args.val_out or os.path.join(folder, "val.lst")
    try:
        items = read_list(args.list)
        dup = [p for p, n in collections.Counter(p for p, _ in items).items() if n > 1]
        if dup:
            raise ValueError(f"{args.list}: {len(dup)} path(s) listed more than once "
                             f"(first: {dup[0]!r})")
        if os.path.abspath(args.list) in (os.path.abspath(train_out), os.path.abspath(val_out)):
            raise ValueError(f"refusing to overwrite the input list {args.list}; choose "
                             "--train-out/--val-out")
        train, val = split_train_val(items, args.val_ratio, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"split_train_val: error: {e}", file=sys.stderr)
        return 1
    write_list(train_out, train)
    write_list(val_out, val)
    classes = len({label for _, label in items})
    print(f"{len(items)} images of {classes} classes: {len(train)} -> {train_out}, "
          f"{len(val)} -> {val_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
