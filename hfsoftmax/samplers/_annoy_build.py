"""Build an Annoy forest from a .npy file of prepared rows, in a separate process.

Run by ``AnnoyForest`` (``python -I _annoy_build.py ROWS.npy OUT.ann METRIC NTREES SEED
N_JOBS``): Annoy's build needs one ``add_item`` call per row, a Python loop that would hold
the trainer's GIL for the whole add phase if run on a thread. In a child process the trainer
only waits on a pipe. Imports numpy and annoy only.
"""
import sys

import numpy as np
from annoy import AnnoyIndex


def main(argv):
    rows_path, out_path, metric, ntrees, seed, n_jobs = argv
    rows = np.load(rows_path, mmap_mode="r")
    index = AnnoyIndex(rows.shape[1], metric)
    index.set_seed(int(seed))
    add = index.add_item
    chunk = 4096  # tolist() per chunk: bounded memory for the Python floats
    for start in range(0, rows.shape[0], chunk):
        for i, row in enumerate(rows[start:start + chunk].tolist(), start):
            add(i, row)
    index.build(int(ntrees), n_jobs=int(n_jobs))
    index.save(out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
