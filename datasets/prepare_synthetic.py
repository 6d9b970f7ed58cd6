#!/usr/bin/env python
"""Prepare the built-in synthetic dataset (see datasets/README.md).

    python datasets/prepare_synthetic.py --out datasets/data/synthetic \
        --num-classes 2000 --images-per-class 20 --seed 0

Deterministic: the same arguments give byte-identical files. Re-running with the same
arguments on a complete folder does nothing (use --force to rewrite).
"""
import os
import sys

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, root)
    from hfsoftmax.data.synthetic import main

    main()
