"""Cost of the classifier side of one training step: HF-Softmax sampled head vs full softmax.

In one run, at the same N (classes), D (feature dim) and B (batch):

- ``sampled_ms``: median time of one sampled step (select + pull + logits + loss + backward
  + push) through :class:`hfsoftmax.heads.SampledHead` against a real parameter-server
  process this script starts (rows live there, SGD momentum 0.9 there);
- ``full_ms``: median time of one full-softmax step (logits over all N rows, cross-entropy,
  backward, ``torch.optim.SGD`` momentum 0.9 on a dense W) in a child process, so that its
  N x D matrices never inflate the trainer's memory figure; ``ratio = full_ms / sampled_ms``;
- ``rebuild_step_ms``: median sampled step time while a background index rebuild runs (the
  training thread keeps stepping on the old index), ``rebuild_vs_quiet`` its ratio to
  ``sampled_ms``;
- memory of the trainer process (psutil RSS): ``rss_mb`` after the quiet steps, with the
  index built (what a training process really holds), ``rss_base_mb`` before any index
  existed (torch, head, client, batch: everything but the index), ``index_rss_mb`` the
  difference, and ``rss_peak_rebuild_mb`` the peak sampled during the background rebuild (the
  rows are read into the trainer transiently while the new index is built). The rows W and
  their momentum never live in the trainer (``server_rss_mb`` shows where they are).
- ``--sampler-process``: the index lives in its own process
  (``build_sampler(..., process=True)``), which reads the rows from the server itself; the
  trainer then holds neither W nor the index, even during a rebuild. ``index_rss_mb`` is
  then the index process's RSS after the quiet steps, ``index_rss_peak_rebuild_mb`` its peak
  during the background rebuild, and ``index_rss_in_trainer_mb`` what the trainer grew by.

    python benchmarks/step_cost.py --num-classes 100000 --dim 256 --batch 256 \\
        --sample-num 1000 --sampler faiss

Prints one JSON object (and writes it to ``--out`` if given).
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("step_cost")


def _mb(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 3) if times else float("nan")


# --------------------------------------------------------------------------- full softmax
def _full_step_child(num_classes: int, dim: int, batch: int, steps: int, threads: int,
                     logit: str, queue) -> None:
    """Child process: time the dense full-softmax classifier step."""
    try:
        torch.set_num_threads(threads)
        from hfsoftmax.heads import FullHead

        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        torch.manual_seed(0)
        head = FullHead(num_classes, dim, logit=logit)
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(1)
        times, peak = [], 0
        for i in range(steps + 1):  # the first step (allocations, momentum buffer) untimed
            x = torch.randn(batch, dim, generator=g, requires_grad=True)
            y = torch.randint(0, num_classes, (batch,), generator=g)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            out = head(x, y)
            out.loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if i:
                times.append(dt)
            peak = max(peak, proc.memory_info().rss)
        queue.put({"full_ms": _median_ms(times), "full_steps": steps,
                   "full_rss_mb": _mb(peak), "full_extra_rss_mb": _mb(peak - rss0)})
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"full_error": repr(exc)})


def time_full(args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    steps = args.full_steps or (3 if args.num_classes >= 500_000 else 10)
    p = ctx.Process(target=_full_step_child, args=(args.num_classes, args.dim, args.batch,
                                                   steps, args.threads, args.logit, q))
    p.start()
    res = q.get(timeout=3600)
    p.join()
    return res


# ------------------------------------------------------------------------- sampled head
def _parse_opts(pairs: list[str]) -> dict:
    opts = {}
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"--sampler-opt takes key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


class _PeakRSS:
    """Samples this process's RSS (or process ``pid``'s) on a thread every 50 ms and keeps
    the peak."""

    def __init__(self, pid: int | None = None):
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def time_sampled(args) -> dict:
    from hfsoftmax.heads import SampledHead
    from hfsoftmax.rowstore import RemoteRowStore, SGDConfig
    from hfsoftmax.samplers import build_sampler
    from paramserver import ParamClient
    from tests.ps_utils import start_server, stop_server

    torch.set_num_threads(args.threads)
    proc = psutil.Process()
    out: dict = {}
    server, address = start_server("--worker-timeout", "600", log_level="WARNING",
                                   timeout_s=120)
    try:
        client = ParamClient(address, timeout_s=600)
        t0 = time.perf_counter()
        store = RemoteRowStore(client, "classifier", args.num_classes, args.dim,
                               SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4),
                               std=0.01, seed=0)
        out["server_create_s"] = round(time.perf_counter() - t0, 2)
        metric = "ip" if args.logit == "linear" else "cosine"
        opts = _parse_opts(args.sampler_opt)
        if args.sampler_process:
            opts["process"] = True
        sampler = build_sampler(args.sampler, args.num_classes, args.dim, metric=metric,
                                seed=0, interval=10**9, background=True, **opts)
        index_pid = getattr(sampler, "pid", None)  # the index process (process mode)
        head = SampledHead(store, sampler, sample_num=args.sample_num, logit=args.logit)
        g = torch.Generator().manual_seed(2)
        batches = [(torch.randn(args.batch, args.dim, generator=g),
                    torch.randint(0, args.num_classes, (args.batch,), generator=g))
                   for _ in range(8)]

        def step(i: int) -> float:
            x, y = batches[i % len(batches)]
            x = x.clone().requires_grad_()
            t = time.perf_counter()
            res = head(x, y)
            res.loss.backward()
            return time.perf_counter() - t

        out["rss_base_mb"] = _mb(proc.memory_info().rss)
        # the first index, built synchronously (what a run does before its first step)
        out["sampler_process"] = index_pid is not None
        with _PeakRSS() as peak:
            t0 = time.perf_counter()
            head.rebuild_index(wait=True)
            out["build_s"] = round(time.perf_counter() - t0, 2)
        out["rss_peak_first_build_mb"] = _mb(peak.peak)
        for i in range(args.warmup):
            step(i)
        quiet = [step(i) for i in range(args.steps)]
        parts = {k: [] for k in ("select_s", "pull_s", "push_s")}
        for i in range(min(20, args.steps)):
            step(i)
            for k in parts:
                parts[k].append(head.telemetry[k])
        out["sampled_ms"] = _median_ms(quiet)
        out["sampled_p90_ms"] = round(float(np.percentile(quiet, 90)) * 1000, 3)
        out.update({f"{k[:-2]}_ms": _median_ms(v) for k, v in parts.items()})
        out["rss_mb"] = _mb(proc.memory_info().rss)
        out["index_rss_mb"] = round(out["rss_mb"] - out["rss_base_mb"], 1)
        if index_pid is not None:
            out["index_rss_in_trainer_mb"] = out["index_rss_mb"]
            out["index_rss_mb"] = _mb(psutil.Process(index_pid).memory_info().rss)
        # steps while a background rebuild runs
        during = []
        child_peak = _PeakRSS(index_pid) if index_pid is not None else None
        if child_peak is not None:
            child_peak.__enter__()
        with _PeakRSS() as peak:
            t0 = time.perf_counter()
            head.rebuild_index(wait=False)
            while sampler.rebuilding and len(during) < args.max_rebuild_steps:
                during.append(step(len(during)))
            steps_done = len(during)
            sampler.wait_rebuild()
            out["background_rebuild_s"] = round(time.perf_counter() - t0, 2)
        if sampler.needs_index:
            out["rebuild_step_ms"] = _median_ms(during)
            out["rebuild_steps"] = steps_done
            out["rebuild_vs_quiet"] = round(out["rebuild_step_ms"] / out["sampled_ms"], 2) \
                if during else None
        else:
            out["rebuild_step_ms"] = out["sampled_ms"]
            out["rebuild_steps"] = 0
            out["rebuild_vs_quiet"] = 1.0
        out["rss_peak_rebuild_mb"] = _mb(peak.peak)
        if child_peak is not None:
            child_peak.__exit__(None, None, None)
            out["index_rss_peak_rebuild_mb"] = _mb(child_peak.peak)
        out["rss_after_rebuild_mb"] = _mb(proc.memory_info().rss)
        out["server_rss_mb"] = _mb(psutil.Process(server.pid).memory_info().rss)
        out["sampler_stats"] = {k: v for k, v in sampler.stats().items()
                                if isinstance(v, (int, float, bool, type(None)))}
        sampler.close()
        client.close()
    finally:
        stop_server(server)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sample-num", type=int, default=1000)
    p.add_argument("--sampler", default="faiss",
                   help="annoy, hnsw, faiss, exact or random (default faiss)")
    p.add_argument("--sampler-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. --sampler-opt ntrees=50 (repeatable)")
    p.add_argument("--sampler-process", action="store_true",
                   help="run the index in its own process (build_sampler(process=True))")
    p.add_argument("--logit", default="linear", help="linear, cosface or arcface")
    p.add_argument("--steps", type=int, default=50, help="timed quiet sampled steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--full-steps", type=int, default=0,
                   help="timed full-softmax steps (default 10, or 3 at N >= 500K)")
    p.add_argument("--max-rebuild-steps", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--skip-full", action="store_true", help="do not time the full softmax")
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    result = {"num_classes": args.num_classes, "dim": args.dim, "batch": args.batch,
              "sample_num": args.sample_num, "sampler": args.sampler,
              "sampler_opts": _parse_opts(args.sampler_opt), "logit": args.logit,
              "sampler_process": args.sampler_process,
              "threads": args.threads, "cpus": os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version()}
    result.update(time_sampled(args))
    if not args.skip_full:
        result.update(time_full(args))
        if "full_ms" in result:
            result["ratio"] = round(result["full_ms"] / result["sampled_ms"], 1)
    from hfsoftmax.fileio import write_json

    print(write_json(args.out, result) if args.out else json.dumps(result))
    return result


if __name__ == "__main__":
    main()
