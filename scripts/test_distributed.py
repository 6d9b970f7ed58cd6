"""The check run by scripts/test_distributed.sh on every torchrun process.

all_reduce (sum of ``rank + 1`` over the ranks), broadcast (rank 0's tensor reaches all) and
all_gather (every rank's value in rank order), over the backend
:func:`hfsoftmax.distributed.init_distributed` picks (NCCL with CUDA, gloo on CPU) or
``--backend``. Exits 1 with the mismatch on any rank; rank 0 prints a summary.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from hfsoftmax import distributed as hd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None)
    args = p.parse_args()
    rank, world = hd.init_distributed(args.backend)
    if world == 1:
        print("WORLD_SIZE is 1: run under torchrun (scripts/test_distributed.sh)",
              file=sys.stderr)
        return 2
    backend = dist.get_backend()
    device = torch.device("cuda", hd.local_rank()) if backend == "nccl" else torch.device("cpu")
    errors = []
    t0 = time.perf_counter()

    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    want = world * (world + 1) / 2
    if not torch.all(x == want):
        errors.append(f"all_reduce: got {x[0].item()} want {want}")

    b = torch.arange(16, dtype=torch.float32, device=device) * (7 if rank == 0 else -1)
    dist.broadcast(b, src=0)
    if not torch.equal(b.cpu(), torch.arange(16, dtype=torch.float32) * 7):
        errors.append(f"broadcast: got {b[:4].tolist()}...")

    parts = [torch.zeros(2, device=device) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([rank, rank * 10.0], device=device))
    got = [p.tolist() for p in parts]
    if got != [[float(r), r * 10.0] for r in range(world)]:
        errors.append(f"all_gather: got {got}")
    dist.barrier()
    elapsed = time.perf_counter() - t0

    ok = torch.tensor([0.0 if errors else 1.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    for e in errors:
        print(f"[rank {rank}] FAILED {e}", file=sys.stderr)
    if rank == 0:
        status = "passed" if ok.item() == 1.0 else "FAILED"
        print(f"distributed check {status}: {world} processes, backend {backend}, device "
              f"{device.type}; all_reduce, broadcast, all_gather in {elapsed * 1000:.1f} ms")
    hd.destroy_distributed()
    return 0 if ok.item() == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
