"""Must show 7 (3 shards give the same results as 1), and CURVE authentication."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy as np
import pytest

from paramserver import ParamClient, ParamServerError
from tests.ps_utils import ROOT, run_workers, running_server, server_log

pytestmark = pytest.mark.timeout(180)


def _train(ps: ParamClient, rng: np.random.Generator, n: int, d: int, steps: int) -> None:
    """Pull, compute a weight-dependent gradient, push; lr change midway; set_rows once."""
    for step in range(1, steps + 1):
        if step == 5:
            ps.set_lr("w", 0.02)
            ps.set_rows("w", [0, n - 1, n // 2], np.full((3, d), 0.25, np.float32))
        rows = rng.integers(0, n, size=64)
        rows[:3] = [0, n - 1, n // 2]  # the shard edges and duplicates
        w = ps.pull("w", rows)
        target = rng.standard_normal((64, d)).astype(np.float32)
        ps.push("w", rows, (w - target) / 64)


def test_three_shards_equal_one_server(tmp_path):
    n, d, steps = 1001, 8, 10  # 1001 rows: uneven shard sizes 333/334/334
    with running_server() as (_, addr):
        with ParamClient(addr, timeout_s=30) as ps:
            ps.create_table("w", n, d, init="normal", std=0.1, seed=7)
            ps.set_optimizer("w", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
            init_one = ps.read_all("w")
            _train(ps, np.random.default_rng(0), n, d, steps)
            one = ps.read_all("w")
            one_mom = ps.read_all("w", field="momentum")
            probe = np.random.default_rng(1).integers(0, n, 500)
            one_pull = ps.pull("w", probe)

    folder = ("--snapshot-dir", str(tmp_path))
    with contextlib.ExitStack() as stack:
        addrs = [stack.enter_context(running_server(*folder))[1] for _ in range(3)]
        with ParamClient(addrs, timeout_s=30) as ps:
            assert ps.create_table("w", n, d, init="normal", std=0.1, seed=7) is True
            ps.set_optimizer("w", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
            np.testing.assert_array_equal(ps.read_all("w", chunk_rows=100), init_one)
            _train(ps, np.random.default_rng(0), n, d, steps)
            np.testing.assert_array_equal(ps.read_all("w", chunk_rows=100), one)
            np.testing.assert_array_equal(ps.read_all("w", field="momentum"), one_mom)
            np.testing.assert_array_equal(ps.pull("w", probe), one_pull)
            info = ps.table_info("w")
            assert info["num_rows"] == n and info["step"] == steps
            assert [(s["row_start"], s["row_stop"]) for s in info["shards"]] == \
                [(0, 333), (333, 667), (667, 1001)]
            ps.snapshot("snap")
            files = sorted(p.name for p in tmp_path.iterdir())
            assert files == [f"snap.{i:05d}-of-00003" for i in range(3)]
        # A second client that did not create the table learns the routing from the shards.
        with ParamClient(addrs) as other:
            np.testing.assert_array_equal(other.pull("w", probe), one_pull)
            with pytest.raises(ParamServerError, match="do not tile"):
                with ParamClient(addrs[::-1]) as reversed_order:
                    reversed_order.pull("w", probe)

    # The 3 shard files restore into 3 fresh servers.
    with contextlib.ExitStack() as stack:
        addrs = [stack.enter_context(running_server(*folder))[1] for _ in range(3)]
        with ParamClient(addrs) as ps:
            ps.restore("snap")
            np.testing.assert_array_equal(ps.read_all("w"), one)
            assert ps.table_info("w")["step"] == steps
            with pytest.raises(ParamServerError, match="is shard 1 of 3, not 0 of 1"):
                with ParamClient(addrs[0]) as single:
                    single.restore("snap.00001-of-00003")
            np.testing.assert_array_equal(ps.read_all("w"), one)  # refused before changing
            # One shard's file is bad: no shard restores (each checks its file first).
            _train(ps, np.random.default_rng(2), n, d, 2)
            moved, moved_mom = ps.read_all("w"), ps.read_all("w", field="momentum")
            assert ps.table_info("w")["step"] == steps + 2
            bad = tmp_path / "snap.00001-of-00003"
            bad.write_bytes(bad.read_bytes()[:-16])  # truncated
            with pytest.raises(ParamServerError, match="snap.00001-of-00003"):
                ps.restore("snap")
            np.testing.assert_array_equal(ps.read_all("w"), moved)
            np.testing.assert_array_equal(ps.read_all("w", field="momentum"), moved_mom)
            assert ps.table_info("w")["step"] == steps + 2


def test_two_workers_over_two_shards_synchronous():
    """Every worker pushes to every shard each step (maybe no rows), so each shard's step
    completes; results equal one server."""
    n, d = 100, 4
    rows = np.array([[1, 2, 3, 2], [60, 61, 2, 99]])  # worker 0 touches only shard 0

    def run(addrs):
        with ParamClient(addrs) as ps:
            ps.create_table("w", n, d, init="normal", std=1.0, seed=3)
            ps.set_optimizer("w", lr=0.1, momentum=0.5)

        def worker(k):
            with ParamClient(addrs, worker_id=k, timeout_s=30) as ps:
                for _ in range(3):
                    w = ps.pull("w", rows[k])
                    ps.push("w", rows[k], w * 0.5)

        run_workers(worker, (0, 1))
        with ParamClient(addrs) as ps:
            return ps.read_all("w"), ps.table_info("w")["step"]

    with running_server("--workers", "2") as (_, a):
        one, step1 = run([a])
    with running_server("--workers", "2") as (_, a), running_server("--workers", "2") as (_, b):
        two, step2 = run([a, b])
    assert step1 == step2 == 3
    np.testing.assert_array_equal(one, two)


def test_curve_authentication(tmp_path):
    from paramserver.keys import make_keys

    out = subprocess.run([sys.executable, "-m", "paramserver.keys", str(tmp_path / "srv"),
                          "server"], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    make_keys(tmp_path / "allowed", "worker0")
    make_keys(tmp_path / "intruder", "eve")
    server_pub = tmp_path / "srv" / "server.key"
    with running_server("--curve-secret-key", str(tmp_path / "srv" / "server.key_secret"),
                        "--curve-public-keys-dir", str(tmp_path / "allowed")) as (proc, addr):
        with ParamClient(addr, timeout_s=10, curve_server_key=str(server_pub),
                         curve_secret_key=str(tmp_path / "allowed" / "worker0.key_secret")) as ps:
            ps.create_table("w", 10, 2)
            assert ps.pull("w", [1]).shape == (1, 2)
        with ParamClient(addr, timeout_s=2, curve_server_key=str(server_pub),
                         curve_secret_key=str(tmp_path / "intruder" / "eve.key_secret")) as ps:
            with pytest.raises(TimeoutError):
                ps.ping()
        with ParamClient(addr, timeout_s=2) as ps:  # plain-text client: no answer
            with pytest.raises(TimeoutError):
                ps.ping()
        assert "CURVE authentication on: 1 allowed" in server_log(proc)
    # A non-loopback bind is allowed with CURVE.
    with running_server("--curve-secret-key", str(tmp_path / "srv" / "server.key_secret"),
                        "--curve-public-keys-dir", str(tmp_path / "allowed"),
                        bind="tcp://0.0.0.0:*") as (proc, addr):
        assert "NO authentication" not in server_log(proc)


def test_catchup_decay_counts_the_steps_a_shard_gets_no_rows():
    """catchup_decay over 2 shards: steps whose rows all lie in shard 0 still decay shard
    1's rows (each shard gets every step, an empty push included): equal to one table."""
    from paramserver import SGDConfig, Table

    n, d = 10, 3
    local = Table("w", n, d, init="normal", std=0.5, seed=4,
                  optim=SGDConfig(lr=0.5, weight_decay=0.1, catchup_decay=True))
    with contextlib.ExitStack() as stack:
        addrs = [stack.enter_context(running_server())[1] for _ in range(2)]
        with ParamClient(addrs, timeout_s=30) as ps:
            ps.create_table("w", n, d, init="normal", std=0.5, seed=4)
            ps.set_optimizer("w", lr=0.5, weight_decay=0.1, catchup_decay=True)
            for rows in ([0, 1], [2], [1, 7], [3, 3]):  # shard 1 holds rows 5..9
                g = np.ones((len(rows), d), np.float32)
                ps.push("w", rows, g)
                local.apply_grad(np.array(rows), g)
            np.testing.assert_array_equal(ps.read_all("w"), local.read(0, n))
            np.testing.assert_allclose(ps.pull("w", [9])[0], local.weight[9] * 0.95 ** 4,
                                       rtol=1e-6)
