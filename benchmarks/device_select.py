#!/usr/bin/env python
"""Cost of one batch's class selection: the ``device`` sampler against the host indexes.

Side by side in one run, on the same clustered rows and queries
(``hfsoftmax.samplers.synthetic``), N x D rows, B queries, S classes a batch: for each
backend (``device``, ``exact``, ``faiss`` IVF, ``hnsw``, ``annoy``; default settings) the
build (or copy) seconds, the median ``select()`` ms, recall@10 of its nearest classes
against exact search, and the trainer's RSS growth. For the device sampler also its split:
``device_part_ms`` (the top-k over the copy: the work a GPU takes over) and
``host_part_ms`` (the selection rule on the ids: what stays on the host), and
``gpu_device_part_ms``, that top-k projected for an H100-class GPU (``gpu_model.py``, at
float16).

This machine has no GPU: here the device sampler runs on the CPU in float32, its fallback,
not its target. Its ``select_ms`` here is an exact search on 2 shared cores (compare it with
``exact``, the same work); what carries over to a GPU is the host part.

    python benchmarks/device_select.py --num-rows 100000 --dim 256 \\
        --out benchmarks/results/device_select_100k.json

prints one JSON object (and writes it to ``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

import gpu_model  # noqa: E402
from ann_recall import recall_at_k  # noqa: E402
from hfsoftmax.samplers import build_sampler  # noqa: E402
from hfsoftmax.samplers.selection import (  # noqa: E402
    neighbour_slots, neighbours_per_sample, select_classes)
from hfsoftmax.samplers.synthetic import clustered_rows, queries_near  # noqa: E402
from timing import median_ms  # noqa: E402


def device_split(sampler, x, y, sample_num: int, repeats: int) -> dict:
    """The device sampler's select split into its top-k over the copy and the host rule."""
    b, n = x.shape[0], sampler.num_classes
    k_max = neighbours_per_sample(neighbour_slots(sample_num, 1), b,
                                  sampler.neighbour_oversample)
    xt = torch.from_numpy(x)
    dev_ms = median_ms(lambda: sampler.rows.topk(xt, min(k_max, n)), repeats)
    nb = sampler.rows.topk(xt, min(k_max, n))[1].numpy()
    k = neighbours_per_sample(neighbour_slots(sample_num, np.unique(y).size), b,
                              sampler.neighbour_oversample)
    rng = np.random.default_rng(0)
    host_ms = median_ms(lambda: select_classes(y, nb[:, :k], sample_num, n, rng), repeats)
    return {"device_part_ms": dev_ms, "host_part_ms": host_ms, "k_max": int(k_max)}


def bench(name: str, rows, x, y, exact_ids, metric: str, sample_num: int, repeats: int):
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    s = build_sampler(name, rows.shape[0], rows.shape[1], metric=metric, seed=0,
                      background=False)
    out = {"backend": name}
    t0 = time.perf_counter()
    s.rebuild(rows)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["rss_growth_mb"] = round((proc.memory_info().rss - rss0) / 2**20, 1)
    out["recall@10"] = round(recall_at_k(s.query(x, 10), exact_ids), 4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    out["select_ms"] = median_ms(lambda: s.select(xt, yt, sample_num), repeats)
    out["neighbours_selected"] = s.last_num_neighbours
    if name == "device":
        out.update(device_split(s, x, y, sample_num, repeats))
        out["gpu_device_part_ms"] = round(gpu_model.select_ms(rows.shape[0], rows.shape[1],
                                                              x.shape[0], 2), 2)
    s.close()
    del s
    gc.collect()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sample-num", type=int, default=8000)
    ap.add_argument("--metric", default="cosine", choices=["cosine", "ip"])
    ap.add_argument("--backends", default="device,exact,faiss,hnsw,annoy")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=None, help="JSON file to write (also printed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = clustered_rows(args.num_rows, args.dim, unit=args.metric == "cosine", seed=0)
    x, y = queries_near(rows, args.batch, seed=1)
    ref = build_sampler("exact", args.num_rows, args.dim, metric=args.metric)
    ref.rebuild(rows)
    exact_ids = ref.query(x, 10)
    ref.close()
    del ref
    results = [bench(name, rows, x, y, exact_ids, args.metric, args.sample_num, args.repeats)
               for name in args.backends.split(",")]
    out = {"num_rows": args.num_rows, "dim": args.dim, "batch": args.batch,
           "sample_num": args.sample_num, "metric": args.metric,
           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_avg": [round(v, 2) for v in os.getloadavg()],
           "machine": platform.machine(), "device": "cpu (the device sampler's fallback)",
           "gpu_assumptions": gpu_model.ASSUMED, "results": results}
    if args.out:
        from hfsoftmax.fileio import write_json
        write_json(args.out, out)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
