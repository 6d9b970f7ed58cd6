"""The distributed code paths of hfsoftmax over a real 1-process NCCL group (step 8 of
``tools/gpu_check.py``; run under ``torchrun --standalone --nproc_per_node 1``).

In a world of one, ``hfsoftmax.distributed.is_dist()`` is False and every helper is the
identity, so a plain 1-process torchrun never reaches NCCL. Here the group is initialised
by hand (NCCL, bound to this rank's GPU, ``device_id`` given) and ``is_dist`` reports True,
so the all-gathers, broadcasts and all-reduces run over NCCL on CUDA tensors, and the
sampled head's distributed path (global gather, rank-0 selection, broadcasts, the
all-reduce of its row gradient) must give what its one-process path gives.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from hfsoftmax import distributed as hd
from hfsoftmax.heads import SampledHead
from hfsoftmax.rowstore import LocalRowStore, SGDConfig
from hfsoftmax.samplers import build_sampler

N, D, B, S, STEPS = 2000, 64, 32, 200, 4
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def run_head(dev: torch.device, distributed: bool, logit: str, real_is_dist):
    hd.is_dist = (lambda: True) if distributed else real_is_dist
    logq = {"linear": False, "cosface": "sample", "arcface": True}[logit]
    store = LocalRowStore(N, D, SGDConfig(lr=0.2, weight_decay=5e-4), std=0.1, seed=5)
    sampler = build_sampler("exact", N, D, metric="ip" if logit == "linear" else "cosine",
                            seed=7, background=False, interval=2,
                            random_share=0.5 if logq is True else 0.0)
    head = SampledHead(store, sampler, sample_num=S, logit=logit, s=30.0, m=0.3, logq=logq)
    head.set_lr(0.2)
    gen = torch.Generator().manual_seed(123)
    losses, grads = [], []
    for _ in range(STEPS):
        x = torch.randn(B, D, generator=gen).to(dev).requires_grad_()
        y = torch.randint(0, N, (B,), generator=gen).to(dev)
        out = head(x, y)
        out.loss.backward()
        losses.append(out.loss.detach().cpu())
        grads.append(x.grad.detach().cpu())
    rows = store.read_all()
    sampler.close()
    return torch.stack(losses), torch.stack(grads), rows


def main() -> int:
    dev = torch.device("cuda", hd.local_rank())
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    if dist.get_world_size() != 1:
        print("run with --nproc_per_node 1", file=sys.stderr)
        return 2
    real_is_dist = hd.is_dist
    hd.is_dist = lambda: True
    for t in (torch.randn(5, 3, device=dev), torch.arange(7, device=dev),
              torch.randn(4, 2, dtype=torch.float64)):
        tag = f"{t.dtype} on {t.device}"
        g = hd.all_gather_tensor(t)
        check(g.device == t.device and torch.equal(g, t), f"all_gather_tensor {tag}")
        b = hd.broadcast(t)
        check(torch.equal(b.cpu(), t.cpu()), f"broadcast {tag}")
        if t.is_floating_point():
            check(torch.allclose(hd.all_reduce_mean(t), t), f"all_reduce_mean {tag}")
    hd.barrier()
    for logit in ("linear", "cosface", "arcface"):
        l1, g1, r1 = run_head(dev, True, logit, real_is_dist)
        l0, g0, r0 = run_head(dev, False, logit, real_is_dist)
        check(bool(torch.isfinite(l1).all()), f"{logit}: finite losses over NCCL")
        check(torch.allclose(l1, l0, rtol=1e-5, atol=1e-6), f"{logit}: distributed == one "
              "process (loss)")
        check(torch.allclose(g1, g0, rtol=1e-4, atol=1e-6), f"{logit}: feature gradients")
        check(np.allclose(r1, r0, rtol=1e-5, atol=1e-6), f"{logit}: rows")
    hd.is_dist = real_is_dist
    dist.destroy_process_group()
    if failures:
        print(f"distributed check FAILED: {failures}", file=sys.stderr)
        return 1
    print("distributed check passed (nccl, 1 process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
