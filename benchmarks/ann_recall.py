"""Recall, build time and query time of each class-sampler backend against exact search.

Rows: clustered synthetic class rows (hfsoftmax.samplers.synthetic), 20K x 128 by default
(the figure the tests check: recall@10 >= 0.9 at default settings), optionally 100K x 256.
Also times ``select()`` at batch 256, sample_num 1000. Prints one JSON object.

    python benchmarks/ann_recall.py                       # 20K x 128, both metrics
    python benchmarks/ann_recall.py --num-rows 100000 --dim 256 --metrics cosine
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from hfsoftmax.samplers import build_sampler
from hfsoftmax.samplers.synthetic import clustered_rows, queries_near


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    hits = [len(set(a).intersection(e)) for a, e in zip(approx.tolist(), exact.tolist())]
    return float(np.mean(hits) / exact.shape[1])


def bench_one(name, rows, x, y, exact_ids, metric, k, sample_num, repeats, opts):
    s = build_sampler(name, rows.shape[0], rows.shape[1], metric=metric, seed=0, **opts)
    out = {"backend": name, "metric": metric, "options": opts}
    if name != "random":
        t0 = time.perf_counter()
        s.rebuild(rows)
        out["build_s"] = round(time.perf_counter() - t0, 3)
        s.query(x[:8], k)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ids = s.query(x, k)
            times.append(time.perf_counter() - t0)
        out["query_ms"] = round(1000 * min(times), 2)
        out[f"recall@{k}"] = round(recall_at_k(ids, exact_ids), 4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    s.select(xt, yt, sample_num)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.select(xt, yt, sample_num)
        times.append(time.perf_counter() - t0)
    out["select_ms"] = round(1000 * min(times), 2)
    out["select_neighbours"] = s.last_num_neighbours
    s.close()
    return out


def gil_check(rows, names, metric):
    """CPU share a spinning Python main thread gets while each backend rebuilds in the
    background, next to the share it gets beside a CPU-bound *process* (no GIL shared).
    A backend that held the GIL would leave the main thread near 0."""
    import subprocess
    import sys

    def spin(cond):
        w0, c0 = time.perf_counter(), time.thread_time()
        while cond():
            pass
        return round((time.thread_time() - c0) / (time.perf_counter() - w0), 3)

    burn = subprocess.Popen([sys.executable, "-c", "import numpy as np\na = np.random.rand("
                             "600, 600)\nwhile True: a @ a"])
    try:
        t_end = time.perf_counter() + 3
        out = {"beside_cpu_bound_process": spin(lambda: time.perf_counter() < t_end)}
    finally:
        burn.kill()
    one_thread = {"annoy": {"n_jobs": 1}, "hnsw": {"num_threads": 1},
                  "faiss": {"num_threads": 1}, "exact": {}}
    for name in names:
        s = build_sampler(name, rows.shape[0], rows.shape[1], metric=metric,
                          **one_thread.get(name, {}))
        s.start_rebuild(rows)
        share = spin(lambda: s.rebuilding)
        s.wait_rebuild()
        out[name] = {"main_thread_cpu_share": share, "build_s": round(s.last_rebuild_s, 2)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-rows", type=int, default=20000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--spread", type=float, default=0.5,
                   help="within-cluster spread (0.5: the test set; 1.0: harder)")
    p.add_argument("--family", type=int, default=20, help="rows per cluster")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sample-num", type=int, default=1000)
    p.add_argument("--metrics", default="cosine,ip")
    p.add_argument("--backends", default="annoy,hnsw,faiss,exact,random")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    p.add_argument("--extra", action="store_true",
                   help="also time non-default settings (faiss hnsw, annoy search_k sweep)")
    p.add_argument("--gil-check", action="store_true",
                   help="measure the main thread's CPU share during background builds")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    extra = {}
    if args.gil_check:
        rows = clustered_rows(args.num_rows, args.dim, family=args.family, spread=args.spread)
        extra["gil_check"] = gil_check(rows, [b for b in args.backends.split(",")
                                              if b != "random"], "cosine")
    for metric in args.metrics.split(","):
        rows = clustered_rows(args.num_rows, args.dim, family=args.family, spread=args.spread,
                              unit=(metric == "cosine"), seed=0)
        x, y = queries_near(rows, args.queries, seed=1)
        exact = build_sampler("exact", args.num_rows, args.dim, metric=metric)
        exact.rebuild(rows)
        exact_ids = exact.query(x, args.k)
        runs = [(b, {}) for b in args.backends.split(",")]
        if args.extra:
            runs += [("faiss", {"index_type": "hnsw"}), ("faiss", {"nprobe": 1}),
                     ("faiss", {"nprobe": 16}), ("annoy", {"mips": "augment"}),
                     ("annoy", {"search_k": 1000}), ("annoy", {"search_k": 10000}),
                     ("hnsw", {"ef": 32}), ("hnsw", {"ef": 128})]
        for name, opts in runs:
            results.append(bench_one(name, rows, x, y, exact_ids, metric, args.k,
                                     args.sample_num, args.repeats, opts))
    print(json.dumps({"num_rows": args.num_rows, "dim": args.dim, "spread": args.spread,
                      "family": args.family, "queries": args.queries,
                      "k": args.k, "sample_num": args.sample_num,
                      "torch_threads": torch.get_num_threads(),
                      "machine": platform.machine(), "results": results, **extra}, indent=1))


if __name__ == "__main__":
    main()
