#!/usr/bin/env python
"""Data-pipeline throughput: images/s decoded + transformed (training transform) from an
InsightFace ``.rec`` and from the same images extracted to files by ``tools/rec2img.py``,
through a torch DataLoader with 0 and 2 workers. Also times the synthetic set's generation
and the extraction. Prints one JSON object (and writes it to ``--out`` if given).

    python benchmarks/data_throughput.py --num-classes 500 --images-per-class 20

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


def _loader_rate(ds, workers: int, batch_size: int, epochs: int) -> dict:
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=False,
                                         persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    n = 0
    first_batch_s = None
    for _ in range(epochs):
        for x, y in loader:
            n += x.shape[0]
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"images": n, "seconds": round(total, 3), "images_per_s": round(n / total, 1),
            "first_batch_s": round(first_batch_s, 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="an InsightFace .rec folder (default: "
                    "generate a synthetic set into a temporary folder)")
    ap.add_argument("--num-classes", type=int, default=500)
    ap.add_argument("--images-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--loader-workers", default="0,2", help="comma-separated worker counts")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    from hfsoftmax.data.filelist import ImageListDataset
    from hfsoftmax.data.insightface import InsightFaceRecDataset
    from hfsoftmax.data.synthetic import make_synthetic
    from hfsoftmax.data.transforms import train_transform

    torch.set_num_threads(args.torch_threads)
    result = {"benchmark": "data_throughput", "python": platform.python_version(),
              "torch": torch.__version__, "cpus": os.cpu_count(),
              "batch_size": args.batch_size, "epochs": args.epochs,
              "transform": "decode (PIL) + RandomHorizontalFlip + ToTensor + Normalize"}
    with tempfile.TemporaryDirectory(prefix="hfs-data-bench-") as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, "synthetic")
            t0 = time.process_time()
            gen = make_synthetic(data, args.num_classes, args.images_per_class, args.seed,
                                 workers=args.gen_workers, num_pairs=200)
            gen["main_process_cpu_s"] = round(time.process_time() - t0, 3)
            result["synthetic_generation"] = gen
        images = os.path.join(tmp, "images")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, os.path.join(_root, "tools", "rec2img.py"),
                            "--in-folder", data, "--out-folder", images, "--no-progress",
                            "--workers", "2"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"rec2img failed: {r.stderr}")
        result["rec2img_seconds"] = round(time.perf_counter() - t0, 3)
        sources = {
            "rec": InsightFaceRecDataset(data, transform=train_transform()),
            "files": ImageListDataset(os.path.join(images, "train.lst"), images,
                                      transform=train_transform()),
        }
        result["images"] = len(sources["rec"])
        for name, ds in sources.items():
            for w in [int(x) for x in args.loader_workers.split(",")]:
                result[f"{name}_workers{w}"] = _loader_rate(ds, w, args.batch_size,
                                                            args.epochs)
    from hfsoftmax.fileio import write_json

    print(write_json(args.out, result) if args.out else json.dumps(result))
    return result


if __name__ == "__main__":
    main()
