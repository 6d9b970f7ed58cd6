#!/usr/bin/env python
"""Training throughput (images/s): full softmax vs HF-Softmax at 10K and 100K classes.

Every configuration runs the real trainer (``hfsoftmax.train.run``: data loading from a
``.rec``, backbone forward/backward, head, SGD) for ``--steps`` steps with the same backbone,
batch and images, in one process, one after the other. The images are the first
``--images`` of the synthetic set (prepared at a small size if missing); each run's ``.rec``
relabels them uniformly over C classes, because the classifier's size, not the labels'
meaning, is what changes the cost. Modes:

- ``full``: full softmax, the (C x D) weight and its momentum in the trainer's torch SGD;
- ``hf``: sampled head, rows in this process (``LocalRowStore``);
- ``hf-ps``: sampled head, rows in a parameter-server process on loopback.

The sampled runs select ``--sample-num`` classes per batch with ``--sampler``. images/s is
the median over the logged windows after the first (``--print-freq`` steps each), so
start-up and the first index build (synchronous, at step 0) are excluded: ``img_s`` is the
steady state between index rebuilds; ``index_build_s`` is one rebuild (read all rows, build),
and ``img_s_with_rebuilds`` amortises one rebuild per ``--interval`` steps as if it ran in the
training thread (the trainer's default background rebuild overlaps it with training where
there are spare cores; on 2 cores it competes with the training for them).

    python benchmarks/train_speed.py --steps 40 --out benchmarks/results/train_speed.json

prints one JSON object (also written to ``--out``).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--modes", nargs="+", default=["full", "hf", "hf-ps"],
                   choices=["full", "hf", "hf-ps"])
    p.add_argument("--arch", default="convnet-s")
    p.add_argument("--embedding-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sample-num", type=int, default=1000)
    p.add_argument("--sampler", default="hnsw")
    p.add_argument("--interval", type=int, default=100)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--print-freq", type=int, default=5)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1, help="data-loading workers")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--data", default=os.path.join(ROOT, "datasets", "data", "synthetic_small"),
                   help="a synthetic set folder (prepared with 200 classes if missing)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "train_speed.json"))
    return p.parse_args()


def source_images(data: str, n: int) -> list[bytes]:
    """Encoded images of the synthetic set (prepared small if the folder is missing)."""
    from hfsoftmax.data.insightface import InsightFaceRecDataset

    if not os.path.isfile(os.path.join(data, "train.rec")):
        from hfsoftmax.data.synthetic import make_synthetic

        make_synthetic(data, num_classes=200, images_per_class=20, seed=0)
    ds = InsightFaceRecDataset(data)
    return [ds.read_raw(i % len(ds))[0] for i in range(n)]


def write_relabelled(folder: str, images: list[bytes], num_classes: int, seed: int = 0) -> None:
    """A .rec of ``images`` with labels uniform over ``num_classes`` (no identity records)."""
    from hfsoftmax.data.recordio import IRHeader, RecordIOWriter, pack

    os.makedirs(folder, exist_ok=True)
    labels = np.random.default_rng(seed).integers(0, num_classes, len(images))
    with RecordIOWriter(os.path.join(folder, "train.rec"),
                        os.path.join(folder, "train.idx")) as w:
        for i, (img, lab) in enumerate(zip(images, labels)):
            w.write_idx(i, pack(IRHeader(0, float(lab), i, 0), img))
    with open(os.path.join(folder, "property"), "w") as f:
        f.write(f"{num_classes},112,112")


def start_server(workdir: str) -> tuple[subprocess.Popen, str]:
    ready = tempfile.mktemp(prefix="ps-address-", dir=workdir)  # a fresh name per server
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "paramserver", "paramserver.py"),
                             "--bind", "tcp://127.0.0.1:*", "--ready-file", ready,
                             "--log-level", "WARNING"], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(workdir, "ps.log"), "wb"))
    for _ in range(600):
        if os.path.exists(ready) and os.path.getsize(ready):
            return proc, open(ready).read().strip()
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the parameter server did not start")


def run_one(mode: str, classes: int, rec: str, workdir: str, a: argparse.Namespace) -> dict:
    from hfsoftmax.engine.config import parse_args
    from hfsoftmax.train import run

    save = os.path.join(workdir, f"{mode}-{classes}")
    argv = ["--train-rec", rec, "--arch", a.arch, "--embedding-size", str(a.embedding_size),
            "--batch-size", str(a.batch_size), "--max-steps", str(a.steps),
            "--print-freq", str(a.print_freq), "--workers", str(a.workers),
            "--threads", str(a.threads), "--head", "cosface", "--save-path", save,
            "--save-every", str(10 * a.steps)]
    server = None
    if mode != "full":
        # The first index is built synchronously at step 0 (in the first, discarded window),
        # so the windows measure the steady state between rebuilds; the rebuild's cost is
        # reported beside it and amortised over --interval steps.
        argv += ["--sampled", "--sampler", a.sampler, "--sample-num", str(a.sample_num),
                 "--interval", str(a.interval), "--recall-every", "0",
                 "--no-background-rebuild"]
    if mode == "hf-ps":
        server, address = start_server(workdir)
        argv += ["--ps", address]
    try:
        t0 = time.perf_counter()
        run(parse_args(argv))
        wall = time.perf_counter() - t0
    except Exception:
        if server is not None:
            log = os.path.join(workdir, "ps.log")
            print(f"parameter-server log:\n{open(log, errors='replace').read()}",
                  file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    with open(os.path.join(save, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    img_s = [float(r["img_s"]) for r in rows[1:]] or [float(rows[-1]["img_s"])]
    build = [float(r["rebuild_s"]) for r in rows if r.get("rebuild_s")]
    med = statistics.median(img_s)
    step_s = a.batch_size / med
    out = {"mode": mode, "classes": classes, "img_s": med,
           "img_s_windows": [round(x, 1) for x in img_s], "step_ms": 1000 * step_s,
           "index_build_s": build[0] if build else None, "wall_s": round(wall, 1)}
    if build:  # one rebuild every --interval steps, done in the training thread
        out["img_s_with_rebuilds"] = a.batch_size * a.interval / (a.interval * step_s
                                                                  + build[0])
    return out


def main() -> int:
    a = parse()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    images = source_images(a.data, a.images)
    results = []
    with tempfile.TemporaryDirectory(prefix="train-speed-") as work:
        for classes in a.classes:
            rec = os.path.join(work, f"rec-{classes}")
            write_relabelled(rec, images, classes)
            for mode in a.modes:
                r = run_one(mode, classes, rec, work, a)
                print(f"{mode:6s} {classes:>8d} classes: {r['img_s']:.1f} img/s",
                      file=sys.stderr)
                results.append(r)
    by = {(r["mode"], r["classes"]): r["img_s"] for r in results}
    speedup = {f"{m}_vs_full@{c}": round(by[(m, c)] / by[("full", c)], 2)
               for c in a.classes for m in a.modes if m != "full" and ("full", c) in by}
    report = {"benchmark": "train_speed", "unit": "images/s (median of logged windows)",
              "config": {k: v for k, v in vars(a).items() if k not in ("out", "data")},
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "python": platform.python_version(),
                          "load_avg_1m": os.getloadavg()[0]},
              "results": results, "speedup": speedup}
    from hfsoftmax.fileio import write_json

    write_json(a.out, report, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
