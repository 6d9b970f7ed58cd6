#!/usr/bin/env python
"""Where the time of one HF-Softmax training step goes, and what it would be on a GPU.

Times each part of one step with real pieces: data (the batch to the device), the
backbone's forward, the features' copy to the host, the selection (today's host samplers,
and the ``device`` sampler), the pull of the selected rows from a real parameter-server
process and their copy to the device, the head (logits, loss, backward), the backbone's
backward, the push of the row gradients (the server's SGD), the backbone's optimizer step,
the device sampler's note of the pushed rows, and the recall telemetry (exact search over
all rows). Device parts are timed with ``torch.cuda.Event`` on a GPU, with
``time.perf_counter`` elsewhere (host parts always; a GPU is synchronised around them).

Then it projects one step of the target configuration (ir50, batch 256, 1M classes,
sample_num 8000, D 512) on an H100-class GPU from the measured host parts and the stated
GPU figures of ``gpu_model.py`` (on a GPU, from what it measured there):

* ``gpu_only_ms``: the GPU's own work, backbone forward + backward + SGD and the head;
* ``today_ms``: the current path: features copied to the host (a sync), the host ANN
  query (the default sampler, annoy), pageable copies of the rows in and the gradients out,
  the push inside autograd's backward (the backbone's backward waits for it), recall
  telemetry over all rows on the CPU every ``--recall-every`` steps;
* ``new_path_ms``: selection on the device (its GPU work, one sync, the rule on the ids on
  the host), the pull, pinned copies, and the push overlapped with the backbone's backward,
  modelled as ``max(backward, push)`` (the overlap itself is another change, not made
  here); telemetry on the device copy;
* ``dist_store_ms``: ``--row-store dist`` on one GPU: the rows, their momentum and their SGD
  on the device (no pull, no push, no host work on the ids), the same device selection.

``--reproject FILE`` recomputes the projection from the measurements saved in FILE (e.g.
with another ``--gpu-backbone-ms``), measuring nothing.

Sizes this machine cannot hold or time are measured smaller and scaled by a stated rule:
the host samplers at ``--measure-classes`` rows (default 100K here), scaled to the target
N by how their query cost grows (annoy, hnsw: log N; faiss IVF: sqrt N; exact scans: N);
the backbone at ``--backbone-batch`` images (the GPU figure is assumed here, not scaled
from a CPU); pull and push touch S rows whatever N is.

    python benchmarks/step_breakdown.py    # ~10 min here; writes results/step_breakdown.json
    python benchmarks/step_breakdown.py --quick --out /tmp/sb.json    # tiny sizes (the smoke test)

prints one JSON object (and writes it to ``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpu_model  # noqa: E402
from step_projection import _reproject, project  # noqa: E402,F401

#: how a host sampler's query cost grows with N (the measured time at n is scaled to N)
SCALE_RULES = {"annoy": "log", "hnsw": "log", "faiss": "sqrt", "exact": "linear",
               "device": "linear"}
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "step_breakdown.json"


class Clock:
    """Median milliseconds of repeated calls: CUDA events for device work on a GPU, else
    ``perf_counter`` (``wall``: always, the GPU synchronised before and after)."""

    def __init__(self, device: torch.device, repeats: int):
        self.cuda, self.repeats = device.type == "cuda", repeats

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn, device_timer: bool = True):
        """``(result, ms)`` of one call."""
        self._sync()
        if self.cuda and device_timer:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        return out, 1e3 * (time.perf_counter() - t0)

    def median(self, fn, device_timer: bool = True, warmup: int = 1) -> float:
        times = [self.once(fn, device_timer)[1] for _ in range(warmup + self.repeats)]
        return round(statistics.median(times[warmup:]), 3)

    @property
    def kind(self) -> str:
        return "torch.cuda.Event (device parts), perf_counter (host parts)" if self.cuda \
            else "perf_counter"


# --------------------------------------------------------------------------- measurements
def measure_backbone(args, device, clock) -> dict:
    """data, forward, backward and optimizer of the backbone at ``--backbone-batch``."""
    from hfsoftmax.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone(args.backbone, args.dim).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    bb = args.backbone_batch
    images = torch.randint(0, 256, (bb, 3, args.image_size, args.image_size),
                           dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
    parts = {k: [] for k in ("data", "forward", "backward", "optimizer")}
    for i in range(1 + clock.repeats):
        x, t_data = clock.once(lambda: images.to(device, non_blocking=True).float()
                               .sub_(127.5).div_(128.0), device_timer=False)
        feats, t_fwd = clock.once(lambda: model(x))
        _, t_bwd = clock.once(lambda: feats.backward(torch.ones_like(feats)))
        _, t_opt = clock.once(opt.step)
        opt.zero_grad(set_to_none=True)
        if i:  # the first step (allocations, cudnn autotuning) untimed
            for k, v in zip(parts, (t_data, t_fwd, t_bwd, t_opt)):
                parts[k].append(v)
    out = {f"{k}_ms": round(statistics.median(v), 3) for k, v in parts.items()}
    out.update(backbone=args.backbone, batch=bb, device=str(device),
               params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
    return out


def measure_selection(args, device, clock, rows, x, y) -> tuple[dict, np.ndarray]:
    """Each host sampler's select() and the device sampler's, at ``--measure-classes``;
    the selection rule's host work at the target N. Returns the figures and the device
    sampler's class ids (what pull and push then move)."""
    from hfsoftmax.samplers import build_sampler
    from hfsoftmax.samplers.selection import (neighbour_slots, neighbours_per_sample,
                                              select_classes)

    n, d = rows.shape
    b, s = x.shape[0], args.sample_num
    xd, yd = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    out: dict = {"classes": n, "batch": b, "sample_num": s, "host": {}}
    # today: the host samplers take the features on the host (the copy is timed apart)
    xh, yh = torch.from_numpy(x), torch.from_numpy(y)
    for name in [v for v in args.samplers.split(",") if v]:
        sampler = build_sampler(name, n, d, metric="cosine", seed=0, background=False)
        t0 = time.perf_counter()
        sampler.rebuild(rows)
        build_s = time.perf_counter() - t0
        ms = clock.median(lambda: sampler.select(xh, yh, s), device_timer=False)
        out["host"][name] = {"build_s": round(build_s, 2), "select_ms": ms,
                             "scale_rule": SCALE_RULES.get(name, "const")}
        sampler.close()
    # the device sampler, on this machine's device
    dev = build_sampler("device", n, d, metric="cosine", seed=0, background=False,
                        device=device)
    t0 = time.perf_counter()
    dev.rebuild(rows)
    out["device_copy_s"] = round(time.perf_counter() - t0, 2)
    out["device_select_ms"] = clock.median(lambda: dev.select(xd, yd, s), device_timer=False)
    k_max = neighbours_per_sample(neighbour_slots(s, 1), b, dev.neighbour_oversample)
    out["device_topk_ms"] = clock.median(lambda: dev.rows.topk(xd, min(k_max, n)))
    nb = dev.rows.topk(xd, min(k_max, n))[1].cpu().numpy()
    k = neighbours_per_sample(neighbour_slots(s, np.unique(y).size), b,
                              dev.neighbour_oversample)
    for key, classes in (("host_rule_ms", n), ("host_rule_target_ms", args.num_classes)):
        rng = np.random.default_rng(0)
        out[key] = clock.median(lambda: select_classes(y, nb[:, :k], s, classes, rng),
                                device_timer=False)
    out["device_dtype"] = str(dev.rows.dtype).replace("torch.", "")
    ids = dev.select(x, y, s)[0]
    out["neighbours_selected"] = dev.last_num_neighbours
    # the per-step note of the pushed rows (their new values from the host, as the head)
    w = rows[ids]
    out["note_ms"] = clock.median(lambda: dev.note_rows(ids, w), device_timer=False)
    dev.close()
    return out, ids


def measure_rows(args, device, clock, ids: np.ndarray, features: torch.Tensor) -> dict:
    """Pull, copies, push and the recall telemetry against a real parameter-server
    process holding ``--measure-classes`` x D rows (SGD momentum 0.9, weight decay); the
    pull and push of the same rows held in this process (``--row-store dist``'s shard)."""
    from hfsoftmax.heads.sampled import exact_topk
    from hfsoftmax.rowstore import LocalRowStore, RemoteRowStore, SGDConfig
    from paramserver import ParamClient
    from tests.ps_utils import start_server, stop_server

    n, d, s = args.measure_classes, args.dim, ids.size
    out: dict = {"rows": n, "sample_num": s}
    server, address = start_server("--worker-timeout", "600", log_level="WARNING",
                                   timeout_s=120)
    try:
        client = ParamClient(address, timeout_s=600)
        t0 = time.perf_counter()
        store = RemoteRowStore(client, "classifier", n, d,
                               SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4), seed=0)
        out["server_create_s"] = round(time.perf_counter() - t0, 2)
        out["pull_ms"] = clock.median(lambda: store.pull(ids), device_timer=False)
        w = store.pull(ids)
        grads = np.random.default_rng(0).standard_normal((s, d)).astype(np.float32) * 1e-3
        out["push_ms"] = clock.median(lambda: store.push(ids, grads), device_timer=False)
        # --row-store dist keeps each rank's shard in-process (a paramserver.Table, the same
        # SGD): the pull and push of one process holding all rows (W = 1), no server
        local = LocalRowStore(n, d, SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4), seed=0)
        out["local_pull_ms"] = clock.median(lambda: local.pull(ids), device_timer=False)
        out["local_push_ms"] = clock.median(lambda: local.push(ids, grads), device_timer=False)
        del local
        if device.type == "cuda":  # the copies this machine cannot time without a GPU
            pinned = torch.from_numpy(w).pin_memory()
            g_dev = torch.from_numpy(grads).to(device)
            g_host = torch.empty(g_dev.shape, dtype=g_dev.dtype).pin_memory()
            out["rows_h2d_pageable_ms"] = clock.median(
                lambda: torch.from_numpy(w).to(device), device_timer=False)
            out["rows_h2d_pinned_ms"] = clock.median(
                lambda: pinned.to(device, non_blocking=True))
            out["grad_d2h_pageable_ms"] = clock.median(lambda: g_dev.cpu(), device_timer=False)
            out["grad_d2h_pinned_ms"] = clock.median(
                lambda: g_host.copy_(g_dev, non_blocking=True))
            out["features_d2h_ms"] = clock.median(lambda: features.cpu(), device_timer=False)
        t0 = time.perf_counter()
        exact_topk(features, store, 10, cosine=True)  # reads every row over the wire
        out["telemetry_ms"] = round(1e3 * (time.perf_counter() - t0), 1)
        client.close()
    finally:
        stop_server(server)
    return out


def measure_head(args, device, clock) -> dict:
    """The sampled head's math: CosFace logits over S rows, cross-entropy, backward."""
    from hfsoftmax.heads.logits import LogitSpec

    spec = LogitSpec("cosface", s=64.0, m=0.4)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(args.batch, args.dim, generator=g).to(device).requires_grad_()
    weight = torch.randn(args.sample_num, args.dim, generator=g).to(device).requires_grad_()
    target = torch.randint(0, min(args.batch, args.sample_num), (args.batch,),
                           generator=g).to(device)

    def step():
        logits = spec(feats, weight, target)
        F.cross_entropy(logits, target).backward()

    return {"head_ms": clock.median(step), "batch": args.batch, "sample_num": args.sample_num}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-classes", type=int, default=1_000_000, help="target N")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sample-num", type=int, default=8000)
    ap.add_argument("--backbone", default="ir50")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--measure-classes", type=int, default=None,
                    help="rows actually built and served (default 100K; 1M on a GPU)")
    ap.add_argument("--backbone-batch", type=int, default=None,
                    help="images a backbone step is timed at (default 8; --batch on a GPU)")
    ap.add_argument("--samplers", default=None,
                    help="host samplers to time (default annoy,faiss; faiss on a GPU)")
    ap.add_argument("--today-sampler", default=None,
                    help="the host sampler of today's path (default annoy, the trainer's)")
    ap.add_argument("--recall-every", type=int, default=200, help="the trainer's default")
    ap.add_argument("--syncs-today", type=int, default=8)
    ap.add_argument("--syncs-new", type=int, default=2)
    ap.add_argument("--gpu-backbone-ms", type=float, default=gpu_model.ASSUMED["backbone_ms"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (2,000 rows, D 32, batch 16, convnet-s): a smoke test")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file to write ('' : none)")
    ap.add_argument("--reproject", metavar="JSON", default=None,
                    help="recompute the projection from the measurements in this earlier "
                         "output (its configuration; measures nothing)")
    args = ap.parse_args(argv)
    if args.reproject:
        return _reproject(args)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gpu = device.type == "cuda"
    if args.quick:
        args.dim, args.batch, args.sample_num, args.backbone = 32, 16, 200, "convnet-s"
        args.num_classes = min(args.num_classes, 20_000)
        args.measure_classes = args.measure_classes or 2000
        args.backbone_batch, args.repeats = args.backbone_batch or 4, 1
        args.samplers = args.samplers or "faiss"
    args.measure_classes = min(args.measure_classes or (1_000_000 if gpu else 100_000),
                               args.num_classes)
    args.backbone_batch = args.backbone_batch or (args.batch if gpu else 8)
    args.samplers = args.samplers or ("faiss" if gpu else "annoy,faiss")
    args.today_sampler = args.today_sampler or args.samplers.split(",")[0]
    a = dict(gpu_model.ASSUMED, backbone_ms=args.gpu_backbone_ms)

    from hfsoftmax.samplers.synthetic import clustered_rows, queries_near
    clock = Clock(device, args.repeats)
    t_start = time.perf_counter()
    rows = clustered_rows(args.measure_classes, args.dim, seed=0)
    x, y = queries_near(rows, args.batch, seed=1)
    m = {"device": device.type, "timer": clock.kind}
    m["backbone"] = measure_backbone(args, device, clock)
    m["head"] = measure_head(args, device, clock)
    m["selection"], ids = measure_selection(args, device, clock, rows, x, y)
    m["rows"] = measure_rows(args, device, clock, ids, torch.from_numpy(x).to(device))
    del rows
    result = {
        "date": datetime.date.today().isoformat(), "quick": args.quick,
        "command": "python benchmarks/step_breakdown.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"device": torch.cuda.get_device_name() if gpu else "cpu",
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg": [round(v, 2) for v in os.getloadavg()],
                    "torch": torch.__version__, "python": platform.python_version(),
                    "arch": platform.machine()},
        "measured": m, "gpu_assumptions": a,
        "projection": project(m, args, a),
        "elapsed_s": round(time.perf_counter() - t_start, 1)}
    text = json.dumps(result, indent=1)
    if args.out:
        from hfsoftmax.fileio import write_json
        write_json(args.out, result, indent=1)
    print(text)
    return result


if __name__ == "__main__":
    main()
