#!/usr/bin/env python
"""Data-pipeline throughput: images/s through a torch DataLoader, per JPEG decoder, from an
InsightFace ``.rec`` and from the same images extracted to files by ``tools/rec2img.py``.

In one run, for 1 worker and for all cores (``os.sched_getaffinity``):

* ``uint8_pil`` / ``uint8_torchvision``: what the trainer's loader workers do now (decode to
  uint8 with PIL or ``torchvision.io.decode_jpeg``, collate uint8; flips and normalisation
  happen on the device, timed apart as ``normalize_batch_ms`` on this machine's CPU);
* ``float_pil``: the loader before (PIL decode, flip, ``ToTensor`` + ``Normalize`` to
  float32 in the worker), for comparison.

The faster uint8 decoder over both worker counts is reported as ``faster_decoder`` (the
trainer's ``--decoder`` default follows it: benchmarks/README.md, Data). Also times the
synthetic set's generation and the extraction. Prints one JSON object (and writes it to
``--out`` if given).

    python benchmarks/data_throughput.py --num-classes 200 --images-per-class 20

Without ``--data`` a synthetic set of the given size is generated into a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _root not in sys.path:
    sys.path.insert(0, _root)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _loader_rate(ds, workers: int, batch_size: int, epochs: int, collate=None) -> dict:
    import torch

    from hfsoftmax.engine.data import ShardedBatchSampler

    batches = ShardedBatchSampler(len(ds), batch_size, seed=0)
    kw = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                         collate_fn=collate, **kw)
    t0 = time.perf_counter()
    n = 0
    first_batch_s = None
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for batch in loader:
            n += batch[0].shape[0]
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"images": n, "seconds": round(total, 3), "images_per_s": round(n / total, 1),
            "first_batch_s": round(first_batch_s, 3)}


class _FloatPil:
    """The loader before: PIL decode, flip, ToTensor + Normalize in the worker."""

    def __init__(self, base):
        from hfsoftmax.engine.data import FlipDataset

        self.ds = FlipDataset(base)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        return self.ds[item]


def _normalize_ms(batch_size: int, reps: int = 20) -> float:
    import torch

    from hfsoftmax.data.transforms import normalize_batch

    x = torch.randint(0, 256, (batch_size, 112, 112, 3), dtype=torch.uint8)
    flips = torch.rand(batch_size) < 0.5
    normalize_batch(x, flips)
    t0 = time.perf_counter()
    for _ in range(reps):
        normalize_batch(x, flips)
    return round(1000 * (time.perf_counter() - t0) / reps, 2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="an InsightFace .rec folder (default: "
                    "generate a synthetic set into a temporary folder)")
    ap.add_argument("--num-classes", type=int, default=200)
    ap.add_argument("--images-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--loader-workers", default=None,
                    help="comma-separated worker counts (default: 1 and all cores)")
    ap.add_argument("--sources", default="rec,files", help="rec, files or both")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    from hfsoftmax.data.filelist import ImageListDataset
    from hfsoftmax.data.insightface import InsightFaceRecDataset
    from hfsoftmax.data.synthetic import make_synthetic
    from hfsoftmax.data.uint8 import Uint8Images, collate_uint8

    torch.set_num_threads(args.torch_threads)
    workers = [int(x) for x in args.loader_workers.split(",")] if args.loader_workers \
        else sorted({1, _cores()})
    result = {"benchmark": "data_throughput", "python": platform.python_version(),
              "torch": torch.__version__, "cpus": _cores(), "batch_size": args.batch_size,
              "epochs": args.epochs, "loader_workers": workers,
              "normalize_batch_ms": _normalize_ms(args.batch_size),
              "paths": {"uint8_pil": "decode (PIL) to uint8, collate; flip + normalise on "
                                     "the device",
                        "uint8_torchvision": "decode (torchvision.io.decode_jpeg) to uint8, "
                                             "collate; flip + normalise on the device",
                        "float_pil": "decode (PIL), flip, ToTensor + Normalize to float32 in "
                                     "the worker (the loader before)"}}
    with tempfile.TemporaryDirectory(prefix="hfs-data-bench-") as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, "synthetic")
            t0 = time.process_time()
            gen = make_synthetic(data, args.num_classes, args.images_per_class, args.seed,
                                 workers=args.gen_workers, num_pairs=200)
            gen["main_process_cpu_s"] = round(time.process_time() - t0, 3)
            result["synthetic_generation"] = gen
        sources = {}
        wanted = args.sources.split(",")
        if "rec" in wanted:
            sources["rec"] = InsightFaceRecDataset(data)
        if "files" in wanted:
            images = os.path.join(tmp, "images")
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, os.path.join(_root, "tools", "rec2img.py"),
                                "--in-folder", data, "--out-folder", images, "--no-progress",
                                "--workers", "2"], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"rec2img failed: {r.stderr}")
            result["rec2img_seconds"] = round(time.perf_counter() - t0, 3)
            sources["files"] = ImageListDataset(os.path.join(images, "train.lst"), images)
        result["images"] = len(next(iter(sources.values())))
        rates: dict[str, list[float]] = {"pil": [], "torchvision": []}
        for name, base in sources.items():
            for w in workers:
                for dec in ("pil", "torchvision"):
                    r = _loader_rate(Uint8Images(base, decoder=dec), w, args.batch_size,
                                     args.epochs, collate_uint8)
                    result[f"{name}_uint8_{dec}_workers{w}"] = r
                    rates[dec].append(r["images_per_s"])
                result[f"{name}_float_pil_workers{w}"] = _loader_rate(
                    _FloatPil(base), w, args.batch_size, args.epochs)
    speedup = [t / p for t, p in zip(rates["torchvision"], rates["pil"])]
    result["torchvision_over_pil"] = [round(x, 3) for x in speedup]
    result["faster_decoder"] = "torchvision" if min(speedup) > 1 else \
        "pil" if max(speedup) < 1 else "mixed"
    from hfsoftmax.fileio import write_json

    print(write_json(args.out, result) if args.out else json.dumps(result))
    return result


if __name__ == "__main__":
    main()
