"""The distributed code paths of hfsoftmax over a real 1-process NCCL group (step 8 of
``tools/gpu_check.py``; run under ``torchrun --standalone --nproc_per_node 1``).

In a world of one, ``hfsoftmax.distributed.is_dist()`` is False and every helper is the
identity, so a plain 1-process torchrun never reaches NCCL. Here the group is initialised
by hand (NCCL, bound to this rank's GPU, ``device_id`` given) and ``is_dist`` reports True,
so the all-gathers, broadcasts and all-reduces run over NCCL on CUDA tensors, and the
sampled head's distributed path (global gather, rank-0 selection, broadcasts, the
all-reduce of its row gradient) must give what its one-process path gives; so must the head
over rows sharded over the ranks (``--row-store dist``: the features' all-gather and its
backward's all-reduce, the shards' top-k merged by an all-gather, the softmax normaliser's
max and sum all-reduces), here one shard of all rows.

``--device cpu``: the same over a gloo group on the CPU (to test this script where no GPU
is; ``tools/gpu_check.py`` runs it on CUDA only).
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from hfsoftmax import distributed as hd
from hfsoftmax.heads import DistSampledHead, SampledHead
from hfsoftmax.rowstore import LocalRowStore, SGDConfig
from hfsoftmax.rowstore_dist import DistRowStore
from hfsoftmax.samplers import build_sampler
from hfsoftmax.samplers.sharded import ShardSelector

N, D, B, S, STEPS = 2000, 64, 32, 200, 4
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def run_head(dev: torch.device, distributed: bool, logit: str, real_is_dist):
    """The sampled head over an in-process store, its selection by the ``exact`` sampler."""
    hd.is_dist = (lambda: True) if distributed else real_is_dist
    logq = {"linear": False, "cosface": "sample", "arcface": True}[logit]
    store = LocalRowStore(N, D, SGDConfig(lr=0.2, weight_decay=5e-4), std=0.1, seed=5)
    sampler = build_sampler("exact", N, D, metric="ip" if logit == "linear" else "cosine",
                            seed=7, background=False, interval=2,
                            random_share=0.5 if logq is True else 0.0)
    head = SampledHead(store, sampler, sample_num=S, logit=logit, s=30.0, m=0.3, logq=logq)
    return train_head(head, store.read_all, dev)


def run_dist_head(dev: torch.device, distributed: bool, logit: str, real_is_dist):
    """The head over sharded rows (``--row-store dist``, one shard here) with the device
    copy of the shard on ``dev``."""
    hd.is_dist = (lambda: True) if distributed else real_is_dist
    logq = {"linear": False, "cosface": "sample", "arcface": True}[logit]
    store = DistRowStore(N, D, SGDConfig(lr=0.2, momentum=0.9, weight_decay=5e-4), std=0.1,
                         seed=5, rank=0, world=1)
    sel = ShardSelector(N, D, store.start, store.stop, seed=7, interval=2, background=False,
                        metric="ip" if logit == "linear" else "cosine",
                        random_share=0.5 if logq is True else 0.0)
    head = DistSampledHead(store, sel, sample_num=S, logit=logit, s=30.0, m=0.3, logq=logq)
    return train_head(head.to(dev), store.read_shard, dev)


def train_head(head, read_rows, dev: torch.device):
    """``STEPS`` steps of ``head`` on fixed random batches: (losses, feature grads, rows)."""
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
    rows = read_rows()
    head.sampler.close()
    return torch.stack(losses), torch.stack(grads), rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--device", "cpu"], ["--device", "cuda"]):
        print(f"usage: gpu_check_dist.py [--device cuda|cpu], got {' '.join(argv)}",
              file=sys.stderr)
        return 2
    if argv[-1:] == ["cpu"]:
        dev, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend)
    else:
        dev, backend = torch.device("cuda", hd.local_rank()), "nccl"
        torch.cuda.set_device(dev)
        dist.init_process_group(backend, device_id=dev)
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
    for run, what in ((run_head, "sampled head"), (run_dist_head, "sharded rows")):
        for logit in ("linear", "cosface", "arcface"):
            l1, g1, r1 = run(dev, True, logit, real_is_dist)
            l0, g0, r0 = run(dev, False, logit, real_is_dist)
            tag = f"{what}, {logit}"
            check(bool(torch.isfinite(l1).all()), f"{tag}: finite losses over {backend}")
            check(torch.allclose(l1, l0, rtol=1e-5, atol=1e-6), f"{tag}: distributed == "
                  "one process (loss)")
            check(torch.allclose(g1, g0, rtol=1e-4, atol=1e-6), f"{tag}: feature gradients")
            check(np.allclose(r1, r0, rtol=1e-5, atol=1e-6), f"{tag}: rows")
    hd.is_dist = real_is_dist
    dist.destroy_process_group()
    if failures:
        print(f"distributed check FAILED: {failures}", file=sys.stderr)
        return 1
    print(f"distributed check passed ({backend}, 1 process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
