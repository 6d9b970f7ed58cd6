#!/usr/bin/env python
"""Cost of the fresh rows' exact search per step: ``FreshRows.topk`` against numpy.

Every step a sampler with ``fresh_rows`` scores the batch's features against every kept
row and takes each feature's top-k (:mod:`hfsoftmax.samplers.fresh`). This times, side by
side in one run and on the same data, ``FreshRows.topk`` (torch matmul + ``torch.topk``)
and the numpy form it replaced (matmul, ``argpartition``, a stable sort of the k best), and
checks that both return the same ids. Settings: the accuracy benchmark's (batch 64, D 256,
10,000 rows, k 6) and a larger one (batch 512, D 512, the trainer's cap of 32,768 rows).

    python benchmarks/fresh_rows.py --out benchmarks/results/fresh_rows.json

prints one JSON object (also written to ``--out``); times are the median of ``--repeats``,
torch and numpy's BLAS both on ``--threads`` threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hfsoftmax.samplers.fresh import FreshRows  # noqa: E402
from timing import median_ms  # noqa: E402

#: (batch, dim, kept rows, k): the accuracy benchmark's setting, then a large one
SETTINGS = ((64, 256, 10000, 6), (256, 256, 10000, 10), (512, 512, 32768, 10))


def numpy_topk(queries: np.ndarray, rows: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """The numpy form ``FreshRows.topk`` had before (for the side-by-side timing only)."""
    sc = queries @ rows.T
    part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sc, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return ids[np.take_along_axis(part, order, axis=1)]


def bench(batch: int, dim: int, n: int, k: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, batch, n])
    fresh = FreshRows(n, dim, capacity=n, normalize=True)
    fresh.note(np.arange(n), rng.standard_normal((n, dim)).astype(np.float32), step=0)
    q = rng.standard_normal((batch, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    kept_ids = fresh.ids()
    kept_rows = fresh.values(kept_ids)
    got, _ = fresh.topk(q, k)
    same = bool(np.array_equal(got, numpy_topk(q, kept_rows, kept_ids, k)))
    t_torch = median_ms(lambda: fresh.topk(q, k), repeats)
    t_numpy = median_ms(lambda: numpy_topk(q, kept_rows, kept_ids, k), repeats)
    return {"batch": batch, "dim": dim, "rows": n, "k": k, "torch_ms": t_torch,
            "numpy_ms": t_numpy, "speedup": round(t_numpy / t_torch, 2), "same_ids": same}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file to write (also printed)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error(f"--repeats and --threads must be >= 1, got {args.repeats}, {args.threads}")
    from threadpoolctl import threadpool_limits  # (scikit-learn's dependency)

    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):  # numpy's BLAS on as many threads as torch
        results = [bench(*s, repeats=args.repeats, seed=args.seed) for s in SETTINGS]
    out = {"benchmark": "fresh_rows", "threads": args.threads, "repeats": args.repeats,
           "torch": torch.__version__, "numpy": np.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "loadavg": [round(x, 2) for x in os.getloadavg()], "results": results}
    text = json.dumps(out, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
