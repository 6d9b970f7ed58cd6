"""Row stores: the local store against torch.optim.SGD; local and remote (a real parameter
server process) give identical training; snapshots move between them."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hfsoftmax.heads import SampledHead
from hfsoftmax.rowstore import LocalRowStore, RemoteRowStore, SGDConfig
from hfsoftmax.samplers import build_sampler
from paramserver import ParamClient
from tests.ps_utils import running_server

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)

N, D, B, S = 300, 16, 24, 60


def test_local_store_matches_torch_sgd_on_touched_rows():
    cfg = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    store = LocalRowStore(N, D, SGDConfig(**cfg), std=0.1, seed=2)
    rng = np.random.default_rng(0)
    touched = rng.choice(N, 40, replace=False)
    # torch.optim.SGD on a parameter made of the touched rows (the store's updates are lazy)
    ref = torch.nn.Parameter(torch.from_numpy(store.pull(touched)))
    opt = torch.optim.SGD([ref], **cfg)
    for step in range(4):
        grads = rng.standard_normal((40, D)).astype(np.float32)
        store.push(touched, grads)
        ref.grad = torch.from_numpy(grads)
        opt.step()
        if step == 1:
            store.set_lr(0.02)
            opt.param_groups[0]["lr"] = 0.02
    np.testing.assert_allclose(store.pull(touched), ref.detach().numpy(), rtol=1e-6, atol=1e-7)
    untouched = np.setdiff1d(np.arange(N), touched)
    np.testing.assert_array_equal(store.pull(untouched),
                                  LocalRowStore(N, D, std=0.1, seed=2).pull(untouched))


def test_local_store_rejects_bad_input_and_changes_nothing():
    store = LocalRowStore(N, D, SGDConfig(lr=0.1))
    w0 = store.read_all()
    with pytest.raises(IndexError, match=rf"row id {N} outside \[0, {N}\)"):
        store.pull(np.array([0, N]))
    with pytest.raises(ValueError, match=r"shape \(2, 16\)"):
        store.push(np.array([1, 2]), np.zeros((2, D + 1), np.float32))
    with pytest.raises(FloatingPointError, match="NaN"):
        store.push(np.array([1, 2]), np.full((2, D), np.nan, np.float32))
    with pytest.raises(ValueError, match="integers"):
        store.pull(np.array([0.5]))
    with pytest.raises(ValueError, match="SGDConfig"):
        LocalRowStore(N, D, {"lr": 0.1})
    np.testing.assert_array_equal(store.read_all(), w0)


def test_local_read_in_chunks_and_set_lr():
    store = LocalRowStore(N, D, SGDConfig(lr=0.1, momentum=0.9), seed=5)
    full = store.read_all(chunk_rows=7)
    assert full.shape == (N, D) and full.dtype == np.float32
    np.testing.assert_array_equal(full, store.reader(chunk_rows=64)())
    starts = [s for s, _ in store.iter_chunks(100)]
    assert starts == [0, 100, 200]
    store.set_lr(0.01)
    assert store.optim.lr == 0.01 and store.optim.momentum == 0.9
    with pytest.raises(ValueError, match="lr"):
        store.set_lr(-1.0)


def _train(store, steps: int, logit: str = "cosface", seed: int = 0, snapshot_at=None):
    """Drive a sampled head with an exact sampler for ``steps`` steps; returns the losses."""
    sampler = build_sampler("exact", N, D, metric="ip" if logit == "linear" else "cosine",
                            seed=seed, background=False, interval=3)
    head = SampledHead(store, sampler, sample_num=S, logit=logit, s=30.0, m=0.2)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        x = torch.randn(B, D, generator=g, requires_grad=True)
        y = torch.randint(0, N, (B,), generator=g)
        out = head(x, y)
        out.loss.backward()
        losses.append((float(out.loss.detach()), x.grad.clone()))
        if step == 4:
            head.set_lr(0.05)  # an LR schedule reaches the rows
    return losses


def _store_args():
    return dict(num_rows=N, dim=D, optim=SGDConfig(lr=0.2, momentum=0.9, weight_decay=5e-4),
                std=0.1, seed=11)


@pytest.mark.parametrize("logit", ["linear", "cosface"])
def test_local_and_remote_stores_train_identically(logit):
    a = _store_args()
    local = LocalRowStore(a["num_rows"], a["dim"], a["optim"], std=a["std"], seed=a["seed"])
    local_losses = _train(local, 10, logit)
    with running_server() as (_, address), ParamClient(address, timeout_s=20) as client:
        remote = RemoteRowStore(client, "classifier", **a)
        remote_losses = _train(remote, 10, logit)
        rows_remote = remote.read_all()
        info = remote.info()
    assert info["step"] == 10 and info["optimizer"]["lr"] == pytest.approx(0.05)
    for (ll, lg), (rl, rg) in zip(local_losses, remote_losses):
        assert ll == rl
        assert torch.equal(lg, rg)
    # the same numpy SGD on the same float32 gradients: bit-identical rows
    np.testing.assert_array_equal(rows_remote, local.read_all())
    assert not np.array_equal(rows_remote, LocalRowStore(N, D, std=0.1, seed=11).read_all())


def test_remote_store_create_is_idempotent_and_checks_shape():
    with running_server() as (_, address), ParamClient(address, timeout_s=20) as client:
        s1 = RemoteRowStore(client, "cls", N, D, SGDConfig(lr=0.1), std=0.1, seed=1)
        s1.push(np.array([3]), np.ones((1, D), np.float32))
        s2 = RemoteRowStore(client, "cls", N, D, std=0.1, seed=1)  # existing table kept
        np.testing.assert_array_equal(s2.pull(np.array([3])), s1.pull(np.array([3])))
        s3 = RemoteRowStore(client, "cls")  # shape read from the server
        assert (s3.num_rows, s3.dim) == (N, D)
        with pytest.raises(Exception, match="cls"):
            RemoteRowStore(client, "cls", N + 1, D, std=0.1, seed=1)
        with pytest.raises(ValueError, match="both num_rows and dim"):
            RemoteRowStore(client, "cls", N, None)
        with pytest.raises(IndexError, match=rf"outside \[0, {N}\)"):
            s1.pull(np.array([N]))


def test_remote_reader_runs_on_another_thread_during_training(tmp_path):
    with running_server() as (_, address), ParamClient(address, timeout_s=20) as client:
        store = RemoteRowStore(client, "classifier", N, D, SGDConfig(lr=0.1), seed=3)
        read = store.reader(chunk_rows=50)
        results, errors = [], []

        def reader_loop():
            try:
                for _ in range(5):
                    results.append(read())
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        t = threading.Thread(target=reader_loop)
        t.start()
        rng = np.random.default_rng(0)
        for _ in range(20):  # the training thread keeps using the store's own client
            rows = rng.choice(N, 30, replace=False)
            store.push(rows, rng.standard_normal((30, D)).astype(np.float32))
            store.pull(rows)
        t.join(60)
        assert not errors and len(results) == 5
        assert all(r.shape == (N, D) for r in results)
        np.testing.assert_array_equal(read(), store.read_all())


def test_snapshots_move_between_local_and_remote(tmp_path):
    a = _store_args()
    local = LocalRowStore(a["num_rows"], a["dim"], a["optim"], std=a["std"], seed=a["seed"])
    _train(local, 3)
    local.snapshot(tmp_path / "local.safetensors")
    # the safetensors library reads it (documented format)
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "local.safetensors"))
    np.testing.assert_array_equal(tensors["classifier/weight"], local.read_all())
    # The server's snapshot folder is tmp_path: the remote store names files relative to it.
    with running_server("--snapshot-dir", str(tmp_path)) as (_, address), \
            ParamClient(address, timeout_s=20) as client:
        client.create_table("other", 10, 2, seed=4)  # another run's table on the same server
        other = client.table_info("other", checksum=True)["shards"][0]["checksum"]
        remote = RemoteRowStore(client, "classifier", **a)
        remote.restore("local.safetensors")
        np.testing.assert_array_equal(remote.read_all(), local.read_all())
        assert remote.info()["step"] == 3
        # continue both for 4 steps: identical
        _train(remote, 4, seed=1)
        _train(local, 4, seed=1)
        np.testing.assert_array_equal(remote.read_all(), local.read_all())
        remote.snapshot("runs/remote.safetensors")
        remote.snapshot("runs/old.safetensors")
        remote.delete_snapshot("runs/old.safetensors")
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["remote.safetensors"]
        # only the store's own table was written, and the other table was left as it was
        remote.restore("runs/remote.safetensors")
        assert client.table_info("other", checksum=True)["shards"][0]["checksum"] == other
    fresh = LocalRowStore(N, D, SGDConfig(lr=1.0), std=a["std"], seed=99)
    fresh.restore(tmp_path / "runs" / "remote.safetensors")
    np.testing.assert_array_equal(fresh.read_all(), local.read_all())
    np.testing.assert_array_equal(fresh.table.momentum, local.table.momentum)
    assert fresh.optim == local.optim and fresh.table.updates == 7
    with pytest.raises(ValueError, match="no table 'other'"):
        LocalRowStore(N, D, name="other").restore(tmp_path / "runs" / "remote.safetensors")
    with pytest.raises(ValueError, match="this store is"):
        LocalRowStore(N + 1, D).restore(tmp_path / "runs" / "remote.safetensors")
    from paramserver.snapshot import read_snapshot
    assert list(read_snapshot(tmp_path / "runs" / "remote.safetensors")[0]) == ["classifier"]


def test_local_store_refuses_a_push_whose_duplicate_rows_overflow():
    """The in-process path runs the same check as the server (paramserver.optim.sgd_rows):
    two finite gradients of row 3 that sum to inf are refused, nothing changes."""
    store = LocalRowStore(N, D, SGDConfig(lr=0.1, momentum=0.9), seed=5)
    store.push(np.array([3, 8]), np.ones((2, D), np.float32))
    before, updates = store.table.checksum(), store.table.updates  # weights and momentum
    grads = np.full((3, D), 3e38, np.float32)
    with pytest.raises(FloatingPointError, match=r"table 'classifier': the 2 gradients of "
                                                 r"row 3 sum past the float32 range.*scale "
                                                 r"the gradients down"):
        store.push(np.array([3, 8, 3]), grads)
    assert store.table.checksum() == before and store.table.updates == updates
    store.push(np.array([3, 8, 3]), np.ones((3, D), np.float32))  # still usable
    assert store.table.updates == updates + 1
