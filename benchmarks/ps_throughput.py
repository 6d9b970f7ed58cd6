"""Parameter-server throughput: steps/s of one client that, per step, pulls 1000 random rows
of 256 and pushes their gradients (the workload of ../shared/ANCHORS.md), at 100K and 1M
rows, for one server, two shards, and the same gather + SGD in process (numpy, no ZeroMQ).

    python benchmarks/ps_throughput.py [--rows 100000 1000000] [--seconds 3] [--out FILE]

Prints one JSON object (and writes it to --out if given). Servers are real processes on
free loopback ports, momentum 0.9 and weight decay on (the full SGD path).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paramserver import ParamClient, SGDConfig, Table  # noqa: E402


def start(workdir: Path, i: int) -> tuple[subprocess.Popen, str]:
    ready = workdir / f"addr{i}"
    proc = subprocess.Popen([sys.executable, str(ROOT / "paramserver" / "paramserver.py"),
                             "--bind", "tcp://127.0.0.1:*", "--ready-file", str(ready),
                             "--log-level", "WARNING"], start_new_session=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return proc, ready.read_text().strip()


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads)."""
    import psutil

    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def run_steps(pull, push, rows_total: int, batch: int, dim: int, seconds: float,
              server_pids: list[int] = ()) -> dict:
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((batch, dim)).astype(np.float32) * 1e-3
    for _ in range(20):  # warm-up
        rows = rng.integers(0, rows_total, batch)
        pull(rows)
        push(rows, grads)
    steps, pull_t, push_t = 0, 0.0, 0.0
    cpu0, srv0 = _cpu_s([os.getpid()]), _cpu_s(list(server_pids))
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        rows = rng.integers(0, rows_total, batch)
        a = time.perf_counter()
        pull(rows)
        b = time.perf_counter()
        push(rows, grads)
        push_t += time.perf_counter() - b
        pull_t += b - a
        steps += 1
    elapsed = time.perf_counter() - t0
    client_cpu = (_cpu_s([os.getpid()]) - cpu0) / steps
    server_cpu = (_cpu_s(list(server_pids)) - srv0) / steps
    # CPU time per step is much less sensitive to other load on the machine than wall time;
    # 1 / (client + server CPU) is the rate of a step on otherwise idle cores.
    return {"steps_per_s": round(steps / elapsed, 1), "steps": steps,
            "pull_ms": round(1000 * pull_t / steps, 3), "push_ms": round(1000 * push_t / steps, 3),
            "client_cpu_ms_per_step": round(1000 * client_cpu, 3),
            "server_cpu_ms_per_step": round(1000 * server_cpu, 3),
            "cpu_bound_steps_per_s": round(1 / (client_cpu + server_cpu), 1)}


def bench_server(n_rows: int, shards: int, batch: int, dim: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        procs = [start(Path(d), i) for i in range(shards)]
        try:
            with ParamClient([a for _, a in procs], timeout_s=120) as ps:
                ps.create_table("w", n_rows, dim, init="normal", std=0.01, seed=0)
                ps.set_optimizer("w", lr=0.1, momentum=0.9, weight_decay=5e-4)
                return run_steps(lambda r: ps.pull("w", r),
                                 lambda r, g: ps.push("w", r, g), n_rows, batch, dim, seconds,
                                 [p.pid for p, _ in procs])
        finally:
            for p, _ in procs:
                stop(p)


def bench_local(n_rows: int, batch: int, dim: int, seconds: float) -> dict:
    t = Table("w", n_rows, dim, init="normal", std=0.01, seed=0,
              optim=SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4))
    return run_steps(t.pull, t.apply_grad, n_rows, batch, dim, seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--batch", type=int, default=1000, help="rows pulled/pushed per step")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per case")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    result = {"benchmark": "ps_throughput", "batch_rows": args.batch, "dim": args.dim,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_1m": os.getloadavg()[0]},
              "anchor_original_server_steps_per_s": {"100000": 85, "1000000": 6.7},
              "cases": {}}
    for n in args.rows:
        case = {"in_process_numpy": bench_local(n, args.batch, args.dim, args.seconds),
                "server_1": bench_server(n, 1, args.batch, args.dim, args.seconds),
                "server_2_shards": bench_server(n, 2, args.batch, args.dim, args.seconds)}
        result["cases"][str(n)] = case
        print(f"{n} rows: " + ", ".join(
            f"{k} {v['steps_per_s']} steps/s ({v['cpu_bound_steps_per_s']} CPU-bound)"
            for k, v in case.items()), file=sys.stderr)
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    from hfsoftmax.fileio import write_json  # torch-free, like this benchmark

    print(write_json(args.out, result, indent=1) if args.out else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
