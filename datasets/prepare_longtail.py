#!/usr/bin/env python
"""Prepare the long-tailed synthetic dataset (see datasets/README.md).

    python datasets/prepare_longtail.py --out datasets/data/longtail \
        --num-classes 5000 --min-images 2 --max-images 50 --size-alpha 2.0 --seed 0

The synthetic face-like identities with class sizes from a power law (many identities with
few images, few with many). Deterministic: the same arguments give byte-identical files.
Re-running with the same arguments on a complete folder does nothing (use --force to rewrite).
"""
import os
import sys

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, root)
    from hfsoftmax.data.synthetic import main_longtail

    main_longtail()
