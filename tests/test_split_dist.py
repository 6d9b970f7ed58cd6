"""The threaded push under torch.distributed: 2 gloo ranks, each a worker of a real parameter
server, the sampled head's store on its own thread (ThreadedRowStore) with fresh rows.

The ranks' mean gradient the fresh rows need is all-reduced in the push hook (on the
training thread, before the backbone's backward and its collectives), the socket push runs
on the store's thread; the result equals one process at twice the batch, and rank 0's fresh
rows hold the rows the server stepped to."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hfsoftmax import distributed as hd
from hfsoftmax.heads import SampledHead
from hfsoftmax.heads.push import ThreadedRowStore
from hfsoftmax.rowstore import LocalRowStore, RemoteRowStore, SGDConfig
from hfsoftmax.samplers import build_sampler
from tests.ps_utils import running_server

pytestmark = pytest.mark.timeout(240)

N, D, B, S, STEPS, WORLD = 300, 16, 8, 60, 4, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(WORLD * B, D, generator=g), torch.randint(0, N, (WORLD * B,),
                                                                   generator=g))
            for _ in range(STEPS)]


def _head(store):
    sampler = build_sampler("exact", N, D, metric="cosine", seed=7, background=False,
                            interval=100, fresh_rows=N)
    head = SampledHead(store, sampler, sample_num=S, logit="cosface", s=30.0, m=0.3)
    head.set_lr(0.2)
    return head


def _worker(rank: int, address: str, port: int, outdir: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from paramserver import ParamClient

    hd.init_distributed()
    try:
        client = ParamClient(address, worker_id=rank, timeout_s=60)
        store = ThreadedRowStore(RemoteRowStore(client, "classifier", N, D, SGDConfig(lr=0.2),
                                                std=0.1, seed=5, own_client=True))
        assert store.async_push  # a server: the push needs no collective
        head = _head(store)
        grads = []
        for x, y in _batches():
            xr = x[rank * B:(rank + 1) * B].clone().requires_grad_()
            head(xr, y[rank * B:(rank + 1) * B]).loss.backward()
            grads.append(xr.grad)
        store.wait()
        hd.barrier()
        if rank == 0:
            ids = head.sampler.fresh.ids()
            torch.save({"ids": torch.from_numpy(ids), "grads": torch.stack(grads),
                        "noted": torch.from_numpy(head.sampler.fresh.values(ids)),
                        "rows": torch.from_numpy(store.read_all())},
                       os.path.join(outdir, "rank0.pt"))
        hd.barrier()
        store.close()
    finally:
        hd.destroy_distributed()


def test_two_ranks_with_a_threaded_push_equal_one_process(tmp_path):
    torch.set_num_threads(1)
    with running_server("--workers", str(WORLD), "--worker-timeout", "60") as (_, address):
        mp.spawn(_worker, args=(address, _free_port(), str(tmp_path)), nprocs=WORLD,
                 join=True)
    res = torch.load(tmp_path / "rank0.pt", weights_only=True)
    ref_store = LocalRowStore(N, D, SGDConfig(lr=0.2), std=0.1, seed=5)
    head = _head(ref_store)
    grads = []
    for x, y in _batches():
        x = x.clone().requires_grad_()
        head(x, y).loss.backward()
        grads.append(x.grad)
    ref_rows = torch.from_numpy(ref_store.read_all())
    rows = res["rows"]
    assert float((rows - ref_rows).norm() / ref_rows.norm()) <= 1e-5
    assert not np.allclose(rows.numpy(), LocalRowStore(N, D, std=0.1, seed=5).read_all())
    # rank 0's feature gradient: WORLD x the global batch's for its samples
    assert float((res["grads"] / WORLD - torch.stack(grads)[:, :B]).norm()
                 / torch.stack(grads)[:, :B].norm()) <= 1e-5
    # the fresh rows hold what the server stepped to (the ranks' mean, not rank 0's own)
    assert res["ids"].numel() >= S
    stored = rows[res["ids"]]
    stored = stored / stored.norm(dim=1, keepdim=True)
    assert float((res["noted"] - stored).norm() / stored.norm()) <= 1e-5
