#!/usr/bin/env python
"""Prepare the Hangul glyph set (see datasets/README.md).

    python datasets/prepare_hangul.py --out datasets/data/hangul \
        --num-classes 10000 --images-per-class 4 --seed 0

Rendered Hangul syllables as classes (look-alikes: syllables sharing two of their three
jamo), drawn with the Korean fonts of the Debian packages fonts-nanum, fonts-baekmuk and
fonts-unfonts-core (`apt-get install -y fonts-nanum fonts-baekmuk fonts-unfonts-core`).
Deterministic: the same arguments and font files give byte-identical files. Re-running with
the same arguments on a complete folder does nothing (use --force to rewrite).
"""
import os
import sys

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, root)
    from hfsoftmax.data.hangul import main

    main()
