"""Rows you can move: a 2-shard snapshot restored onto 3 shards and onto 1 (and into a local
store) gives the same rows, momentum and step, and training continues identically;
paramserver.export then --init-rows reproduces the rows bit for bit."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from paramserver import ParamClient
from paramserver.export import export_rows
from paramserver.reshard import load_tables, reshard
from paramserver.snapcheck import SnapshotError
from hfsoftmax.engine.init_weights import init_rows
from hfsoftmax.heads import FullHead
from hfsoftmax.rowstore import LocalRowStore, RemoteRowStore, SGDConfig
from tests.ps_utils import ROOT, running_server

pytestmark = pytest.mark.timeout(240)
N, D = 1001, 8  # uneven shard sizes for 2 and 3 shards


def train(ps, seed, steps):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.integers(0, N, size=64)
        rows[:2] = [0, N - 1]
        w = ps.pull("w", rows)
        ps.push("w", rows, (w - rng.standard_normal((64, D)).astype(np.float32)) / 64)


def state(ps):
    return ps.read_all("w"), ps.read_all("w", field="momentum"), ps.table_info("w")["step"]


@contextlib.contextmanager
def servers(count, folder):
    with contextlib.ExitStack() as stack:
        addrs = [stack.enter_context(running_server("--snapshot-dir", str(folder)))[1]
                 for _ in range(count)]
        with ParamClient(addrs, timeout_s=30) as ps:
            yield ps


def tool(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_shard_snapshot(tmp_path_factory):
    """A table trained on 2 shards (momentum on), snapshotted at step 6, and where 2 more
    steps take it."""
    folder = tmp_path_factory.mktemp("snaps")
    with servers(2, folder) as ps:
        ps.create_table("w", N, D, init="normal", std=0.1, seed=3)
        ps.set_optimizer("w", lr=0.1, momentum=0.9, weight_decay=5e-4)
        train(ps, 0, 6)
        ps.snapshot("run/snap")
        at6 = state(ps)
        train(ps, 1, 2)
        at8 = state(ps)
    assert sorted(os.listdir(folder / "run")) == ["snap.00000-of-00002", "snap.00001-of-00002"]
    return folder, at6, at8


def same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


@pytest.mark.parametrize("count", [3, 1])
def test_a_two_shard_snapshot_restores_onto_another_shard_count(two_shard_snapshot, count):
    folder, at6, at8 = two_shard_snapshot
    r = tool("paramserver.reshard", folder / "run" / "snap", "--shards", count,
             "--from-shards", 2)  # the other test case may have written another set
    assert r.returncode == 0, r.stderr
    with servers(count, folder) as ps:
        ps.restore("run/snap")
        same(state(ps), at6)
        info = ps.table_info("w")
        assert len(info["shards"]) == count
        train(ps, 1, 2)  # the same two steps as on 2 shards
        same(state(ps), at8)


def test_a_local_store_restores_the_shard_files_and_refusals(two_shard_snapshot, tmp_path):
    folder, at6, _ = two_shard_snapshot
    own = tmp_path / "own"
    own.mkdir()
    for i in range(2):
        (own / f"snap.{i:05d}-of-00002").write_bytes(
            (folder / "run" / f"snap.{i:05d}-of-00002").read_bytes())
    store = LocalRowStore(N, D, SGDConfig(lr=0.1), name="w")
    store.restore(own / "snap")
    same((store.read_all(), store.table.momentum, store.table.updates), at6)
    reshard(own / "snap", 3)
    with pytest.raises(SnapshotError, match="several shard counts"):
        store.restore(own / "snap")
    three = load_tables(own / "snap", count=3)["w"]
    same((three.weight, three.momentum, three.updates), at6)
    os.unlink(own / "snap.00001-of-00002")
    with pytest.raises(SnapshotError, match=r"shard file\(s\) \[1\] of 2 are missing"):
        load_tables(own / "snap", count=2)
    (own / "snap.00001-of-00002").write_bytes((own / "snap.00000-of-00002").read_bytes())
    with pytest.raises(SnapshotError, match="says it is shard 0 of 2, its name says 1 of 2"):
        load_tables(own / "snap", count=2)
    with pytest.raises(SnapshotError, match="not found"):
        load_tables(own / "nothing")
    with pytest.raises(ValueError, match="already in 3 shard"):
        reshard(own / "snap", 3, from_count=3)


def test_export_then_init_rows_reproduces_the_rows_bitwise(two_shard_snapshot, tmp_path):
    folder, at6, _ = two_shard_snapshot
    rows = at6[0]
    npy, st = tmp_path / "rows.npy", tmp_path / "rows.safetensors"
    r = tool("paramserver.export", folder / "run" / "snap", "--table", "w", "--out", npy)
    assert r.returncode == 0, r.stderr
    assert export_rows(folder / "run" / "snap", st, table="w", momentum=True) == (N, D)
    np.testing.assert_array_equal(np.load(npy, allow_pickle=False), rows)
    from safetensors.numpy import load_file

    loaded = load_file(str(st))
    np.testing.assert_array_equal(loaded["weight"], rows)
    np.testing.assert_array_equal(loaded["momentum"], at6[1])
    for path in (npy, st):
        local = LocalRowStore(N, D, SGDConfig(lr=0.1), seed=42)
        assert init_rows(None, local, path) == N
        assert local.read_all().tobytes() == rows.tobytes()
    with running_server() as (_, addr):
        remote = RemoteRowStore(ParamClient(addr), "fresh", N, D, SGDConfig(lr=0.1),
                                own_client=True)
        init_rows(None, remote, npy)
        assert remote.read_all().tobytes() == rows.tobytes()
        remote.close()
    head = FullHead(N, D)
    init_rows(head, None, st)
    assert head.weight.detach().numpy().tobytes() == rows.tobytes()
    with pytest.raises(ValueError, match=r"holds float32 \(1001, 8\); this run's classifier "
                                         r"is float32 \(1000, 8\)"):
        init_rows(FullHead(1000, D), None, npy)
    assert tool("paramserver.export", folder / "run" / "snap", "--out", tmp_path / "x.txt"
                ).returncode == 2


def test_the_trainer_starts_from_init_rows(tmp_path):
    from hfsoftmax.train import main
    from tests.train_data import make_tiny_rec

    data = make_tiny_rec(tmp_path / "data", num_classes=40, per_class=4, seed=5)
    rows = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    args = ["--train-rec", str(data), "--arch", "convnet-s", "--embedding-size", "16",
            "--batch-size", "8", "--workers", "0", "--threads", "1", "--head", "linear",
            "--weight-decay", "0", "--sampled", "--sampler", "exact", "--sample-num", "12",
            "--no-background-rebuild", "--recall-every", "0", "--max-steps", "1"]
    out = tmp_path / "run"
    assert main([*args, "--init-rows", str(tmp_path / "rows.npy"), "--save-path", str(out)]) == 0
    ck = torch.load(out / "last.pth", weights_only=True)
    trained = load_tables(out / ck["ps_snapshot"])["classifier"].weight
    changed = (trained != rows).any(axis=1)
    assert 0 < changed.sum() <= 12  # the step's selected rows; every other row is the file's
    np.testing.assert_array_equal(trained[~changed], rows[~changed])
    assert main([*args, "--init-rows", str(tmp_path / "rows.npy"), "--embedding-size", "8",
                 "--save-path", str(tmp_path / "r2")]) == 2
    assert main(["--resume", str(out), "--init-rows", str(tmp_path / "rows.npy")]) == 2


def test_restoring_onto_another_shard_count_without_resharding_says_how(two_shard_snapshot,
                                                                         tmp_path):
    from paramserver import ParamServerError

    folder, _, _ = two_shard_snapshot
    (tmp_path / "run").mkdir()
    for i in range(2):
        name = f"snap.{i:05d}-of-00002"
        (tmp_path / "run" / name).write_bytes((folder / "run" / name).read_bytes())
    with servers(3, tmp_path) as ps:
        store = RemoteRowStore(ps, "w", N, D, SGDConfig(lr=0.1))
        with pytest.raises(ParamServerError, match=r"python -m paramserver.reshard "
                                                   r"<snapshot folder>/run/snap --shards 3"):
            store.restore("run/snap")
