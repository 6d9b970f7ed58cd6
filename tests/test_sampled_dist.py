"""The sampled head under torch.distributed: 2 real gloo processes, each a parameter-server
worker of a real server (``--workers 2``), equal 1 process at twice the batch."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hfsoftmax import distributed as hd
from hfsoftmax.heads import SampledHead
from hfsoftmax.rowstore import LocalRowStore, RemoteRowStore, SGDConfig
from hfsoftmax.samplers import build_sampler
from tests.ps_utils import running_server

pytestmark = pytest.mark.timeout(240)

N, D, B, S, STEPS, WORLD = 400, 16, 10, 80, 5, 2
OPTIM = dict(lr=0.2, momentum=0.9, weight_decay=5e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches():
    """The global batches (2B each), the same in every process."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * B, D, generator=g)
        y = torch.randint(0, N, (WORLD * B,), generator=g)
        out.append((x, y))
    return out


def _make_head(store, logit):
    # arcface runs with random classes in the selection and the log-Q correction, whose
    # offsets rank 0 broadcasts with the ids; cosface with the per-sample correction, for
    # which rank 0 broadcasts every sample's own slots and each rank takes its own samples'
    logq = {"linear": False, "arcface": True, "cosface": "sample"}[logit]
    sampler = build_sampler("exact", N, D, metric="ip" if logit == "linear" else "cosine",
                            seed=7, background=False, interval=2,
                            random_share=0.5 if logq is True else 0.0)
    return SampledHead(store, sampler, sample_num=S, logit=logit, s=30.0, m=0.3, logq=logq)


def _worker(rank: int, address: str, port: int, outdir: str, logit: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from paramserver import ParamClient

    assert hd.init_distributed() == (rank, WORLD)
    try:
        assert hd.is_dist() and hd.world_size() == WORLD and hd.rank() == rank
        with ParamClient(address, worker_id=rank, timeout_s=60) as client:
            store = RemoteRowStore(client, "classifier", N, D, SGDConfig(**OPTIM), std=0.1,
                                   seed=5)
            head = _make_head(store, logit)
            losses, grads, targets = [], [], []
            for x, y in _batches():
                xr = x[rank * B:(rank + 1) * B].clone().requires_grad_()
                out = head(xr, y[rank * B:(rank + 1) * B])
                out.loss.backward()
                losses.append(out.loss.detach())
                grads.append(xr.grad)
                targets.append(out.target)
            hd.barrier()
            result = {"losses": torch.stack(losses), "grads": torch.stack(grads),
                      "targets": torch.stack(targets),
                      "rebuilds": torch.tensor(head.stats()["rebuilds"])}
            if rank == 0:
                result["rows"] = torch.from_numpy(store.read_all())
            # helpers: uneven gather and broadcast with a shape header
            part = torch.full((rank + 1, 2), float(rank))
            result["gathered"] = hd.all_gather_tensor(part)
            result["bcast"] = hd.broadcast(torch.arange(6).reshape(2, 3) if rank == 0 else None)
            result["mean"] = hd.all_reduce_mean(torch.tensor([float(rank)]))
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        hd.destroy_distributed()


def _reference(logit: str):
    """One process at batch WORLD*B over a local store with the same settings."""
    store = LocalRowStore(N, D, SGDConfig(**OPTIM), std=0.1, seed=5)
    head = _make_head(store, logit)
    losses, grads = [], []
    for x, y in _batches():
        x = x.clone().requires_grad_()
        out = head(x, y)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(x.grad)
    return torch.stack(losses), torch.stack(grads), store.read_all()


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("logit", ["linear", "arcface", "cosface"])
def test_two_gloo_ranks_equal_one_process_at_twice_the_batch(logit, tmp_path):
    torch.set_num_threads(1)
    with running_server("--workers", str(WORLD), "--worker-timeout", "60") as (_, address):
        mp.spawn(_worker, args=(address, _free_port(), str(tmp_path), logit), nprocs=WORLD,
                 join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ref_losses, ref_grads, ref_rows = _reference(logit)
    # the mean of the ranks' losses is the loss over the global batch
    mean_loss = (res[0]["losses"] + res[1]["losses"]) / WORLD
    assert rel_err(mean_loss, ref_losses) <= 1e-5
    # each rank's feature gradient is WORLD x the global-batch gradient of its samples (its
    # loss is a mean over B, not WORLD*B; DDP's averaging of the backbone restores the factor)
    for r in range(WORLD):
        assert rel_err(res[r]["grads"] / WORLD, ref_grads[:, r * B:(r + 1) * B]) <= 1e-5
    # the rows after STEPS synchronous steps: the server's mean of the two pushes
    assert rel_err(res[0]["rows"], torch.from_numpy(ref_rows)) <= 1e-5
    assert not np.allclose(res[0]["rows"].numpy(),
                           LocalRowStore(N, D, std=0.1, seed=5).read_all())
    # only rank 0 builds the index
    assert int(res[0]["rebuilds"]) == 3 and int(res[1]["rebuilds"]) == 0
    # helpers
    want = torch.cat([torch.zeros(1, 2), torch.ones(2, 2)])
    for r in range(WORLD):
        assert torch.equal(res[r]["gathered"], want)
        assert torch.equal(res[r]["bcast"], torch.arange(6).reshape(2, 3))
        assert torch.equal(res[r]["mean"], torch.tensor([0.5]))


def test_helpers_in_a_world_of_one():
    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK") if k in os.environ}
    try:
        assert hd.init_distributed() == (0, 1)
        assert not hd.is_dist() and hd.rank() == 0 and hd.world_size() == 1 and hd.is_main()
        t = torch.arange(4)
        assert hd.all_gather_tensor(t) is t and hd.broadcast(t) is t
        assert hd.all_reduce_mean(t) is t
        hd.barrier()
        with pytest.raises(ValueError, match="needs the tensor"):
            hd.broadcast(None)
    finally:
        os.environ.update(env)


def test_init_distributed_names_missing_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        hd.init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="valid: nccl, gloo, mpi"):
        hd.init_distributed(backend="tcp")


def _fresh_worker(rank: int, port: int, outdir: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    hd.init_distributed()
    try:
        store = LocalRowStore(N, D, SGDConfig(lr=0.2), std=0.1, seed=5)  # momentum 0, no wd
        sampler = build_sampler("exact", N, D, metric="cosine", seed=7, background=False,
                                interval=100, fresh_rows=N)
        head = SampledHead(store, sampler, sample_num=S, logit="cosface", s=30.0, m=0.3)
        head.set_lr(0.2)
        # count the all-reduces a step makes (the real collective runs underneath)
        calls, real = [], dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: calls.append(t.numel()) or real(t, *a, **k)
        try:
            for x, y in _batches()[:2]:
                xr = x[rank * B:(rank + 1) * B].clone().requires_grad_()
                head(xr, y[rank * B:(rank + 1) * B]).loss.backward()
        finally:
            dist.all_reduce = real
        if rank == 0:
            ids = sampler.fresh.ids()
            torch.save({"ids": torch.from_numpy(ids), "reduced": torch.tensor(calls),
                        "noted": torch.from_numpy(sampler.fresh.values(ids)),
                        "rows": torch.from_numpy(store.pull(ids))},
                       os.path.join(outdir, "fresh.pt"))
        hd.barrier()
    finally:
        hd.destroy_distributed()


def test_fresh_rows_under_two_ranks_hold_the_rows_the_store_stepped_to(tmp_path):
    """Rank 0 notes the pushed rows' new values from the ranks' *mean* gradient (the one the
    store applies), so with momentum 0 they are the stored rows, not rank 0's own step."""
    torch.set_num_threads(1)
    mp.spawn(_fresh_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = torch.load(tmp_path / "fresh.pt", weights_only=True)
    assert res["ids"].numel() >= S                      # two steps' rows were noted
    rows = res["rows"] / res["rows"].norm(dim=1, keepdim=True)  # kept normalised (cosine)
    assert rel_err(res["noted"], rows) <= 1e-5
    # one S x D all-reduce per step: the store's mean is the one the fresh rows use
    assert res["reduced"].tolist() == [S * D, S * D]
