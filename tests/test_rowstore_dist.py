"""The sampled head's rows sharded over torch.distributed ranks (``--row-store dist``):
2 real gloo processes at batch B equal one process at batch 2B, for the full softmax
sharded and for sampled selections (linear, CosFace with the per-sample log-Q correction
and the every-step decay with its cap, ArcFace with the random top-up's log-Q, a step whose
selection lies on one rank only); the shards' snapshots restore (2 processes: stop, restore,
go on = straight) and read as a sharded server's. Backbone-free: the features are the
inputs, so the rows, losses and feature gradients are compared directly.
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hfsoftmax import distributed as hd
from hfsoftmax.heads import DistSampledHead, SampledHead, correct_count
from hfsoftmax.rowstore import LocalRowStore, SGDConfig
from hfsoftmax.rowstore_dist import DistRowStore, shard_bounds
from hfsoftmax.samplers import build_sampler
from hfsoftmax.samplers.sharded import ShardSelector

pytestmark = pytest.mark.timeout(120)

N, D, B, STEPS, WORLD, HALF = 60, 16, 8, 8, 2, 4
MOMENTUM = dict(lr=0.2, momentum=0.9, weight_decay=5e-4)
DECAY_CAP = dict(lr=0.5, weight_decay=5e-3, catchup_decay=True, max_norm=0.5)
#: name -> (logit, sample_num, logq, random_share, nearest, SGD settings)
CASES = {
    "full-linear": ("linear", N, False, 0.0, True, MOMENTUM),
    "full-cosface": ("cosface", N, False, 0.0, True, DECAY_CAP),
    "sampled-linear": ("linear", 40, False, 0.0, True, MOMENTUM),
    "sampled-cosface-logq-sample": ("cosface", 40, "sample", 0.0, True, DECAY_CAP),
    "sampled-arcface-logq-random": ("arcface", 40, True, 0.5, True, MOMENTUM),
    # labels only, all in rank 0's shard: rank 1 has no selected row and still decays
    "one-rank-only": ("cosface", 2 * B, False, 0.0, False, DECAY_CAP),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(case: str):
    """The global batches (2B each), the same in every process."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * B, D, generator=g)
        if case == "one-rank-only":
            y = torch.randperm(WORLD * B, generator=g)       # 16 distinct labels < N / 2
        else:
            y = torch.randint(0, N, (WORLD * B,), generator=g)
        out.append((x, y))
    return out


def _head(case: str, rank: int | None = None, world: int | None = None):
    logit, sample_num, logq, share, nearest, optim = CASES[case]
    store = DistRowStore(N, D, SGDConfig(**optim), std=0.1, seed=5, rank=rank, world=world)
    sel = ShardSelector(N, D, store.start, store.stop, seed=7, interval=3, background=False,
                        metric="ip" if logit == "linear" else "cosine", random_share=share,
                        nearest=nearest)
    # .to(): what the trainer does with a head (nn.Module's _apply must be torch's own)
    return DistSampledHead(store, sel, sample_num, logit=logit, s=30.0, m=0.3,
                           logq=logq).to("cpu")


def _run(head, batches, rank: int, world: int, steps=range(STEPS)):
    """Train ``steps`` of ``batches``, this rank's part; losses, feature grads, correct."""
    losses, grads, correct = [], [], []
    for i in steps:
        x, y = batches[i]
        b = x.shape[0] // world
        xr = x[rank * b:(rank + 1) * b].clone().requires_grad_()
        out = head(xr, y[rank * b:(rank + 1) * b])
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(xr.grad)
        correct.append(correct_count(out))
    return torch.stack(losses), torch.stack(grads), torch.stack(correct)


def _shard_state(store) -> dict:
    t = store.table
    return {"rows": torch.from_numpy(store.read_shard()), "momentum": torch.from_numpy(
        t.momentum.copy()), "updates": torch.tensor(t.updates)}


def _worker(rank: int, port: int, outdir: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    hd.init_distributed(backend="gloo")
    try:
        result = {}
        for case in CASES:
            head = _head(case)
            losses, grads, correct = _run(head, _batches(case), rank, WORLD)
            result[case] = {"losses": losses, "grads": grads, "correct": correct,
                            "neighbours": torch.tensor(head.sampler.last_num_neighbours),
                            **_shard_state(head.rowstore)}
        # checkpoint and resume: stop at HALF, snapshot, go on (straight); a new head
        # restored from the snapshot runs the second half again
        case = "sampled-cosface-logq-sample"
        batches, snap = _batches(case), os.path.join(outdir, "rows_step4.safetensors")
        head = _head(case)
        _run(head, batches, rank, WORLD, range(HALF))
        head.rowstore.snapshot(snap)
        rng = head.sampler.rng.bit_generator.state
        _run(head, batches, rank, WORLD, range(HALF, STEPS))
        again = _head(case)
        again.rowstore.restore(snap)
        again.sampler.rng.bit_generator.state = rng
        again.step = HALF
        _run(again, batches, rank, WORLD, range(HALF, STEPS))
        result["resume"] = {"straight": _shard_state(head.rowstore),
                            "resumed": _shard_state(again.rowstore)}
        # a shard only rank 1 cannot read: both ranks raise (none waits in a collective)
        bad = os.path.join(outdir, "rows_bad.safetensors")
        head.rowstore.snapshot(bad)
        hd.barrier()
        if rank == 1:
            with open(head.rowstore.shard_path(bad), "r+b") as fh:
                fh.truncate(100)
        hd.barrier()
        try:
            _head(case).rowstore.restore(bad)
            result["bad_restore"] = "restored"
        except ValueError as e:
            result["bad_restore"] = str(e)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        hd.destroy_distributed()


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case trained by 2 gloo processes (one spawn for all), and the snapshot."""
    out = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_ranks_equal_one_process_at_twice_the_batch(case, two_ranks):
    _, res = two_ranks
    head = _head(case)                                   # a world of one: one shard
    ref_losses, ref_grads, ref_correct = _run(head, _batches(case), 0, 1)
    ref = _shard_state(head.rowstore)
    for r in range(WORLD):
        # every rank's loss is the global batch's mean
        assert rel_err(res[r][case]["losses"], ref_losses) <= 1e-5
        # a rank's feature gradient is W x its samples' share of the global mean's (DDP
        # averages the backbone's gradients over the ranks)
        assert rel_err(res[r][case]["grads"] / WORLD, ref_grads[:, r * B:(r + 1) * B]) <= 1e-5
        assert int(res[r][case]["updates"]) == STEPS
    assert torch.equal(res[0][case]["correct"] + res[1][case]["correct"], ref_correct)
    # the sampled cases did select nearest classes (merged over the shards), as one process
    near = int(res[0][case]["neighbours"])
    assert near == int(res[1][case]["neighbours"]) == head.sampler.last_num_neighbours
    assert (near > 0) == (case.startswith("sampled"))
    rows = torch.cat([res[r][case]["rows"] for r in range(WORLD)])
    momentum = torch.cat([res[r][case]["momentum"] for r in range(WORLD)])
    assert rel_err(rows, ref["rows"]) <= 1e-4
    if CASES[case][-1] is MOMENTUM:
        assert rel_err(momentum, ref["momentum"]) <= 1e-4
    # the rows did train
    assert rel_err(rows, torch.from_numpy(DistRowStore(N, D, std=0.1, seed=5).read_shard())) \
        > 1e-3
    if case == "one-rank-only":  # rank 1 took no gradient, only the every-step decay
        assert rows[N // 2:].norm() < 0.99 * torch.from_numpy(
            DistRowStore(N, D, std=0.1, seed=5).read_shard()[N // 2:]).norm()


def test_sharded_rows_resume_equal_straight(two_ranks):
    _, res = two_ranks
    for r in range(WORLD):
        a, b = res[r]["resume"]["straight"], res[r]["resume"]["resumed"]
        assert int(a["updates"]) == int(b["updates"]) == STEPS
        assert rel_err(b["rows"], a["rows"]) <= 1e-6


def test_shard_snapshots_read_as_a_sharded_servers(two_ranks, tmp_path):
    from paramserver.reshard import reshard

    out, _ = two_ranks
    snap = str(out / "rows_step4.safetensors")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("rows_step4")) == \
        ["rows_step4.safetensors.00000-of-00002", "rows_step4.safetensors.00001-of-00002"]
    # a world of one refuses the 2-shard snapshot, naming the tool that rewrites it
    one = DistRowStore(N, D, std=0.1, seed=5)
    with pytest.raises(ValueError, match=r"2 shard\(s\).*1 rank.*paramserver.reshard "
                                         r".*--shards 1"):
        one.restore(snap)
    # the in-process store joins the shards; after resharding for 1, so does one shard
    local = LocalRowStore(N, D, std=0.1, seed=5)
    local.restore(snap)
    assert local.table.updates == HALF
    reshard(snap, 1, out=str(tmp_path / "one.safetensors"))
    one.restore(tmp_path / "one.safetensors")
    np.testing.assert_array_equal(one.read_shard(), local.read_all())
    np.testing.assert_array_equal(one.table.momentum, local.table.momentum)


def test_world_of_one_equals_the_sampled_head_over_a_local_store():
    """One shard in one process is the sampled head with the ``device`` sampler (whose copy
    takes ``w - lr * grad`` for a stepped row: exact without momentum and weight decay; a
    cap changes no direction, which is all a cosine search sees)."""
    for case, optim in (("full-linear", dict(lr=0.2)), ("sampled-linear", dict(lr=0.2)),
                        ("sampled-cosface-logq-sample", dict(lr=0.5, max_norm=0.5))):
        logit, sample_num, logq, share, _, _ = CASES[case]
        store = LocalRowStore(N, D, SGDConfig(**optim), std=0.1, seed=5)
        sampler = build_sampler("device", N, D, metric="ip" if logit == "linear" else "cosine",
                                seed=7, background=False, interval=3, random_share=share)
        ref = SampledHead(store, sampler, sample_num, logit=logit, s=30.0, m=0.3, logq=logq)
        head = _head(case)
        head.rowstore.table.optim = SGDConfig(**optim)
        ref.set_lr(optim["lr"])   # the sampled head notes w - lr * grad only with its LR set
        head.set_lr(optim["lr"])
        for x, y in _batches(case):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            a, b = ref(xa, y), head(xb, y)
            a.loss.backward()
            b.loss.backward()
            assert rel_err(b.loss.detach(), a.loss.detach()) <= 1e-5
            assert rel_err(xb.grad, xa.grad) <= 1e-4
            assert int(correct_count(a)) == int(correct_count(b))
        assert rel_err(head.rowstore.read_shard(), store.read_all()) <= 1e-4, case


def test_shards_tile_the_table_and_name_the_owner():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    store = DistRowStore(10, 4, rank=1, world=3)
    assert (store.start, store.stop) == (3, 6)
    np.testing.assert_array_equal(store.pull([3, 5]), LocalRowStore(10, 4).pull([3, 5]))
    with pytest.raises(IndexError, match="row 7 is rank 2's shard; rank 1 holds rows"):
        store.pull([3, 7])
    with pytest.raises(RuntimeError, match="gather_rows"):
        store.read_all()
    store.set_rows(np.arange(10), np.ones((10, 4), np.float32))   # keeps its own rows only
    assert store.read_shard().sum() == 12 and store.version == 1
    with pytest.raises(ValueError, match="cannot be sharded over 3 ranks"):
        DistRowStore(2, 4, rank=0, world=3)
    with pytest.raises(ValueError, match="selector is for rows"):
        DistSampledHead(store, ShardSelector(10, 4, 0, 3), 5)


def test_a_shard_one_rank_cannot_read_fails_every_rank(two_ranks):
    _, res = two_ranks
    assert "rank(s) [1] could not read their shard" in res[0]["bad_restore"]
    assert "rows_bad.safetensors.00001-of-00002" in res[1]["bad_restore"]
