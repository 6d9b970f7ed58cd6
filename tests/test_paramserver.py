"""The parameter server through real server processes on random loopback ports.

Must-show tests 1-3 of issue 2 (SGD equals torch, 2 workers at B equal 1 at 2B, 8 concurrent
clients equal a sequential reference), plus the client API, CLI and error replies.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from paramserver import ParamClient, ParamServerError
from paramserver.table import init_rows
from tests.ps_utils import (SERVER_SCRIPT, run_workers, running_server, server_log, start_server,
                            stop_server)

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max relative error: the largest |a - b| over the largest |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ must show 1: torch SGD
@pytest.mark.parametrize("nesterov", [False, True])
def test_20_steps_equal_torch_sgd_dense(nesterov):
    n, d = 40, 16
    rng = np.random.default_rng(10)
    with running_server() as (_, addr), ParamClient(addr, timeout_s=10) as ps:
        ps.create_table("w", n, d, init="normal", std=0.5, seed=3)
        ps.set_optimizer("w", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        p = torch.nn.Parameter(torch.from_numpy(ps.read_all("w")))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        for step in range(1, 21):
            if step == 11:  # lr changed at step 10 -> 11
                ps.set_lr("w", 0.01)
                opt.param_groups[0]["lr"] = 0.01
            g = rng.standard_normal((n, d)).astype(np.float32)
            assert ps.push("w", np.arange(n), g) == step
            p.grad = torch.from_numpy(g)
            opt.step()
        info = ps.table_info("w")
        assert info["step"] == 20 and info["optimizer"]["lr"] == 0.01
        assert rel_err(ps.read_all("w", chunk_rows=7), p.detach().numpy()) <= 1e-5
        buf = opt.state[p]["momentum_buffer"].numpy()
        assert rel_err(ps.read_all("w", field="momentum"), buf) <= 1e-5


@pytest.mark.parametrize("nesterov", [False, True])
def test_20_steps_equal_torch_sgd_sparse_rows(nesterov):
    """Pushes of varying row subsets with duplicates: each touched row follows torch SGD on
    that row (lazy update); untouched rows never move."""
    n, d = 30, 8
    rng = np.random.default_rng(11)
    with running_server() as (_, addr), ParamClient(addr, timeout_s=10) as ps:
        ps.create_table("w", n, d, init="uniform", std=1.0, seed=4)
        ps.set_optimizer("w", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        w0 = ps.read_all("w")
        params = [torch.nn.Parameter(torch.from_numpy(w0[i].copy())) for i in range(n)]
        opts = [torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=5e-4,
                                nesterov=nesterov) for q in params]
        touched = set()
        for step in range(1, 21):
            if step == 11:
                ps.set_lr("w", 0.02)
                for o in opts:
                    o.param_groups[0]["lr"] = 0.02
            rows = rng.integers(0, n - 5, size=15)  # rows n-5.. never pushed
            g = rng.standard_normal((15, d)).astype(np.float32)
            ps.push("w", rows, g)
            for r in np.unique(rows):
                params[r].grad = torch.from_numpy(g[rows == r].sum(axis=0))
                opts[r].step()
                touched.add(int(r))
        ref = np.stack([q.detach().numpy() for q in params])
        got = ps.read_all("w")
        assert rel_err(got, ref) <= 1e-5
        np.testing.assert_array_equal(got[n - 5:], w0[n - 5:])
        assert len(touched) > 10


# ------------------------------------------------ must show 2: 2 workers at B == 1 at 2B
def _quadratic_grads(w_rows: np.ndarray, targets: np.ndarray, batch: int) -> np.ndarray:
    """Gradient of mean_i 0.5 * |w[r_i] - t_i|^2 over a batch: depends on the pulled rows."""
    return ((w_rows - targets) / batch).astype(np.float32)


def test_two_workers_at_b_equal_one_worker_at_2b():
    n, d, B, steps = 50, 8, 16, 10
    rng = np.random.default_rng(2)
    rows = rng.integers(0, n, size=(steps, 2 * B))  # overlapping rows across the halves
    targets = rng.standard_normal((steps, 2 * B, d)).astype(np.float32)

    def setup(ps):
        ps.create_table("w", n, d, init="normal", std=0.1, seed=9)
        ps.set_optimizer("w", lr=0.5, momentum=0.9, weight_decay=5e-4)

    with running_server("--workers", "1") as (_, addr), ParamClient(addr, timeout_s=10) as ps:
        setup(ps)
        for t in range(steps):
            w = ps.pull("w", rows[t])
            ps.push("w", rows[t], _quadratic_grads(w, targets[t], 2 * B))
        single = ps.read_all("w")

    with running_server("--workers", "2", "--worker-timeout", "30") as (_, addr):
        with ParamClient(addr, worker_id=0, timeout_s=30) as ps:
            setup(ps)

        def worker(k):
            with ParamClient(addr, worker_id=k, timeout_s=30) as ps:
                half = slice(k * B, (k + 1) * B)
                for t in range(steps):
                    w = ps.pull("w", rows[t, half])
                    assert ps.push("w", rows[t, half],
                                   _quadratic_grads(w, targets[t, half], B)) == t + 1

        run_workers(worker, (0, 1))
        with ParamClient(addr) as ps:
            double = ps.read_all("w")
            assert ps.table_info("w")["step"] == steps

    assert rel_err(double, single) <= 1e-5
    assert not np.allclose(double, init_rows("normal", 0, n, d, 0.1, 9)), "nothing trained"


# --------------------------------- must show 3: 8 concurrent clients == sequential reference
def test_eight_concurrent_clients_equal_sequential_reference():
    n, d, W, steps = 20, 4, 8, 5
    lr, mom, wd = 0.1, 0.9, 1e-3
    rng = np.random.default_rng(3)
    rows = rng.integers(0, n, size=(steps, W, 12))  # heavy overlap across clients
    targets = rng.standard_normal((steps, W, 12, d)).astype(np.float32)

    with running_server("--workers", str(W), "--worker-timeout", "30") as (proc, addr):
        with ParamClient(addr) as ps:
            ps.create_table("w", n, d, init="normal", std=1.0, seed=1)
            ps.set_optimizer("w", lr=lr, momentum=mom, weight_decay=wd)
            w0 = ps.read_all("w")
        barrier = threading.Barrier(W)

        def client(k):
            with ParamClient(addr, worker_id=k, timeout_s=30) as ps:
                barrier.wait()
                for t in range(steps):
                    w = ps.pull("w", rows[t, k])
                    ps.push("w", rows[t, k], _quadratic_grads(w, targets[t, k], 12))

        run_workers(client, range(W))
        with ParamClient(addr) as ps:
            got = ps.read_all("w")

    # Sequential reference in plain numpy (float64): per step, every client's gradient from
    # the weights after the previous step, summed per row, averaged over the W clients.
    w = w0.astype(np.float64)
    buf = np.zeros_like(w)
    for t in range(steps):
        g = np.zeros_like(w)
        touched = np.zeros(n, bool)
        for k in range(W):
            np.add.at(g, rows[t, k], (w[rows[t, k]] - targets[t, k]) / 12 / W)
            touched[rows[t, k]] = True
        g[touched] += wd * w[touched]
        buf[touched] = mom * buf[touched] + g[touched]
        w[touched] -= lr * buf[touched]
    assert rel_err(got, w.astype(np.float32)) <= 1e-5
    assert not np.allclose(got, w0)


# ------------------------------------------------------------------------- client API
def test_client_api_and_error_replies(tmp_path):
    with running_server() as (proc, addr), ParamClient(addr, timeout_s=10) as ps:
        assert ps.ping()[0]["protocol"] == 1
        assert ps.create_table("emb", 100, 6, init="zeros") is True
        assert ps.create_table("emb", 100, 6, init="zeros") is False  # idempotent
        with pytest.raises(ParamServerError, match="different settings"):
            ps.create_table("emb", 100, 7, init="zeros")
        with pytest.raises(ParamServerError, match="unknown init"):
            ps.create_table("other", 10, 2, init="xavier")
        with pytest.raises(ParamServerError, match="no table"):
            ps.pull("missing", [0])
        with pytest.raises(IndexError, match="row 100 outside"):
            ps.pull("emb", [5, 100])
        out = ps.pull("emb", np.array([3, 3, 99], dtype=np.int32))
        assert out.dtype == np.float32 and out.shape == (3, 6) and not out.any()
        vals = np.arange(12, dtype=np.float32).reshape(2, 6)
        ps.set_rows("emb", [7, 2], vals)
        np.testing.assert_array_equal(ps.pull("emb", [2, 7, 2]), vals[[1, 0, 1]])
        with pytest.raises(ParamServerError, match="lr must be finite and >= 0"):
            ps.set_optimizer("emb", lr=-0.1)
        with pytest.raises(ParamServerError, match="nesterov"):
            ps.set_optimizer("emb", lr=0.1, nesterov=True)
        ps.set_optimizer("emb", lr=1.0)
        with pytest.raises(ParamServerError, match="not finite"):
            ps.push("emb", [1], np.full((1, 6), np.nan))
        with pytest.raises(ParamServerError, match="is ahead"):
            ps.push("emb", [1], np.ones((1, 6)), step=3)
        assert ps.push("emb", [1, 1], np.ones((2, 6))) == 1
        np.testing.assert_array_equal(ps.pull("emb", [1]), np.full((1, 6), -2.0, np.float32))
        with pytest.raises(ParamServerError, match="stale"):
            ps.push("emb", [1], np.ones((1, 6)), step=1)
        full = ps.read_all("emb", chunk_rows=9)
        assert full.shape == (100, 6) and full[7, 1] == 1.0
        with pytest.raises(ParamServerError, match="is absolute; give a path relative"):
            ps.snapshot(tmp_path / "nope" / "snap")
        assert ps.snapshot("nope/snap")[0]["path"] == "nope/snap"  # sub-folders are made
        assert (proc.snapshot_dir / "nope" / "snap").is_file()
        assert not (tmp_path / "nope").exists()
    assert "refused" in server_log(proc)


def test_timeout_names_address_and_client_recovers():
    proc, addr = start_server()
    try:
        with ParamClient(addr, timeout_s=5) as ps:
            ps.create_table("t", 4, 2)
            proc.send_signal(signal.SIGSTOP)  # server alive but silent
            try:
                with pytest.raises(TimeoutError, match=addr.replace(".", r"\.")):
                    ps.pull("t", [0])
            finally:
                proc.send_signal(signal.SIGCONT)
            assert ps.pull("t", [1]).shape == (1, 2)  # new socket, no stale reply mix-up
    finally:
        stop_server(proc)


def test_sigterm_stops_cleanly_and_help_lists_flags():
    proc, addr = start_server()
    assert stop_server(proc) == 0
    assert "stopped" in server_log(proc)
    out = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--bind", "--workers", "--worker-timeout", "--restore", "--curve-secret-key",
                 "--curve-public-keys-dir", "--insecure", "--snapshot-dir"):
        assert flag in out.stdout


def test_non_loopback_bind_needs_auth_or_insecure():
    out = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--bind", "tcp://0.0.0.0:*"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to bind" in out.stderr
    proc, addr = start_server("--insecure", bind="tcp://0.0.0.0:*")
    try:
        assert "NO authentication" in server_log(proc)
    finally:
        stop_server(proc)


def test_is_loopback():
    from paramserver.paramserver import is_loopback

    for a in ("tcp://127.0.0.1:5570", "tcp://localhost:1", "tcp://[::1]:5", "ipc:///tmp/x",
              "tcp://127.0.0.5:*"):
        assert is_loopback(a), a
    for a in ("tcp://*:5570", "tcp://0.0.0.0:1", "tcp://10.0.0.1:5", "tcp://eth0:5",
              "tcp://example.com:5"):
        assert not is_loopback(a), a


def test_raw_req_socket_client_from_protocol_md():
    """A client written from PROTOCOL.md alone, on a REQ socket (not the Python client)."""
    import json

    import zmq

    with running_server() as (_, addr):
        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.linger = 0
        s.rcvtimeo = 10_000
        s.connect(addr)

        def call(header, *arrays):
            specs = [{"dtype": {"i": "int64", "f": "float32"}[a.dtype.kind],
                      "shape": list(a.shape)} for a in arrays]
            s.send_multipart([json.dumps({**header, "arrays": specs}).encode()]
                             + [a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays])
            header, *frames = s.recv_multipart()  # REQ strips the empty delimiter
            h = json.loads(header)
            return h, [np.frombuffer(f, "<" + {"int64": "i8", "float32": "f4"}[d["dtype"]])
                       .reshape(d["shape"]) for f, d in zip(frames, h.get("arrays", []))]

        try:
            h, _ = call({"op": "create_table", "table": "t", "num_rows": 8, "dim": 3,
                         "init": "zeros"})
            assert h["ok"] and h["created"]
            h, _ = call({"op": "set_optimizer", "table": "t", "lr": 0.5})
            assert h["ok"]
            h, _ = call({"op": "push", "table": "t", "worker": 0, "step": 1},
                        np.array([2, 2], np.int64), np.ones((2, 3), np.float32))
            assert h == {"ok": True, "id": None, "step": 1, "workers": [0]}
            h, (vals,) = call({"op": "pull", "table": "t", "id": "q1"}, np.array([2, 0]))
            assert h["ok"] and h["id"] == "q1" and h["step"] == 1
            np.testing.assert_array_equal(vals, [[-1.0] * 3, [0.0] * 3])
            h, _ = call({"op": "pull", "table": "t"}, np.array([8]))
            assert not h["ok"] and "row 8 outside [0, 8)" in h["error"]
        finally:
            s.close()
            ctx.term()


def test_message_size_limit_is_checked_before_sending():
    with running_server("--max-message-bytes", str(1 << 24)) as (_, addr):
        with ParamClient(addr, timeout_s=10) as ps:
            ps.create_table("t", 70_000, 64, init="zeros")
            with pytest.raises(ValueError, match="exceeds the limit of 16777216"):
                ps.set_rows("t", np.arange(70_000), np.ones((70_000, 64)))
            with pytest.raises(ParamServerError, match="read in smaller chunks"):
                ps.read_all("t", chunk_rows=70_000)
            assert ps.read_all("t", chunk_rows=60_000).shape == (70_000, 64)
            assert ps.pull("t", [0]).shape == (1, 64)  # still connected


def test_push_whose_summed_gradient_overflows_is_refused_and_changes_nothing():
    """Two gradients of row 4, each a finite 3e38, sum to inf in float32: the push gets an
    error naming the row and the fix, the table (weights, momentum, step) is unchanged, and
    the worker can push the same step again. Also the update check: a finite gradient whose
    momentum update overflows is refused when the step is applied."""
    with running_server() as (proc, addr), ParamClient(addr, timeout_s=10) as ps:
        ps.create_table("w", 20, 4, init="normal", seed=1)
        ps.set_optimizer("w", lr=0.1, momentum=0.9)
        assert ps.push("w", [1, 4], np.ones((2, 4))) == 1

        def state():
            info = ps.table_info("w", checksum=True)
            shard = info["shards"][0]
            return shard["checksum"], shard["step"], shard["pending"]

        before = state()
        momentum = ps.read_all("w", field="momentum")
        big = np.full((3, 4), 3e38, np.float32)
        big[1] = 1.0  # row 7: fine
        with pytest.raises(ParamServerError, match=r"the 2 gradients of row 4 sum past the "
                                                   r"float32 range.*scale the gradients"):
            ps.push("w", [4, 7, 4], big)
        assert state() == before
        np.testing.assert_array_equal(ps.read_all("w", field="momentum"), momentum)

        # Step 2 again, in range: 3e38 once sets row 4's momentum to ~3e38 ...
        assert ps.push("w", [4], big[:1]) == 2
        before = state()
        # ... so the same gradient again overflows the momentum: refused at apply time.
        with pytest.raises(ParamServerError, match=r"step 3 of table 'w' was not applied: .*"
                                                   r"update of row 4 leaves the float32 range"
                                                   r".*push step 3 again"):
            ps.push("w", [4], big[:1])
        assert state() == before and before[1] == 2 and before[2] is None
        assert ps.push("w", [4], np.ones((1, 4))) == 3
        assert np.isfinite(ps.read_all("w")).all()
    log = server_log(proc)
    assert "row 4 sum past the float32 range" in log and "step 3 not applied" in log


def test_overflowing_push_is_refused_alone_while_other_workers_wait():
    """With 2 workers the bad push is refused at once (it does not poison the step): the
    other worker's pending push stays pending and completes when the first pushes again."""
    with running_server("--workers", "2", "--worker-timeout", "60") as (_, addr):
        with ParamClient(addr, worker_id=0, timeout_s=30) as ps0, \
                ParamClient(addr, worker_id=1, timeout_s=30) as ps1:
            ps0.create_table("w", 10, 2, init="zeros")
            ps0.set_optimizer("w", lr=1.0)
            done = []
            other = threading.Thread(
                target=lambda: done.append(ps1.push("w", [3], np.ones((1, 2)))))
            other.start()
            try:
                def pending():
                    return ps0.table_info("w")["shards"][0]["pending"]

                deadline = time.monotonic() + 10
                while pending() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert pending() == {"step": 1, "workers": [1]}  # worker 1 waits for 0
                with pytest.raises(ParamServerError, match="row 5 sum past the float32"):
                    ps0.push("w", [5, 5], np.full((2, 2), 3e38))
                assert pending() == {"step": 1, "workers": [1]}
                assert ps0.push("w", [5, 5], np.ones((2, 2))) == 1
            finally:
                other.join(30)
            assert done == [1]
            np.testing.assert_array_equal(ps0.pull("w", [3, 5]), [[-0.5, -0.5], [-1, -1]])


def test_renorm_setting_reaches_the_server():
    """set_optimizer(renorm=...) over the wire: pushed rows come back at that norm, the
    setting is reported."""
    with running_server() as (_, addr), ParamClient(addr, timeout_s=10) as ps:
        ps.create_table("w", 20, 4, init="normal", std=0.01, seed=1)
        ps.set_optimizer("w", lr=0.5, momentum=0.9, renorm=1.5)
        before = ps.read_all("w")
        ps.push("w", np.array([2, 5]), np.ones((2, 4), np.float32))
        after = ps.read_all("w")
        np.testing.assert_allclose(np.linalg.norm(after[[2, 5]], axis=1), 1.5, rtol=1e-6)
        np.testing.assert_array_equal(np.delete(after, [2, 5], 0), np.delete(before, [2, 5], 0))
        assert ps.table_info("w")["optimizer"]["renorm"] == 1.5
        ps.set_optimizer("w", lr=0.25, max_norm=1.0)  # a cap: only rows above it shrink
        ps.push("w", np.array([2, 7]), np.ones((2, 4), np.float32))
        capped = ps.read_all("w")
        np.testing.assert_allclose(np.linalg.norm(capped[2]), 1.0, rtol=1e-6)
        np.testing.assert_allclose(capped[7], after[7] - 0.25, rtol=1e-6)  # norm ~0.5: kept
        assert np.linalg.norm(after[2] - 0.25) > 1.5  # row 2 was above the cap
        assert ps.table_info("w")["optimizer"]["max_norm"] == 1.0
        with pytest.raises(ParamServerError, match="exclude each other"):
            ps.set_optimizer("w", lr=0.5, renorm=1.0, max_norm=1.0)
        np.testing.assert_array_equal(ps.read_all("w"), capped)


def test_catchup_decay_setting_reaches_the_server():
    """set_optimizer(catchup_decay=True) over the wire: pull and read give what an
    in-process table gives for the same pushes (every row decayed every step), and the
    setting is reported; a momentum with it is refused, changing nothing."""
    from paramserver import SGDConfig, Table

    rng = np.random.default_rng(3)
    local = Table("w", 30, 4, init="normal", std=0.5, seed=2,
                  optim=SGDConfig(lr=0.5, weight_decay=0.1, catchup_decay=True))
    with running_server() as (_, addr), ParamClient(addr, timeout_s=10) as ps:
        ps.create_table("w", 30, 4, init="normal", std=0.5, seed=2)
        ps.set_optimizer("w", lr=0.5, weight_decay=0.1, catchup_decay=True)
        for _ in range(6):
            rows = rng.integers(0, 30, size=5)
            g = rng.standard_normal((5, 4)).astype(np.float32)
            ps.push("w", rows, g)
            local.apply_grad(rows, g)
        np.testing.assert_array_equal(ps.read_all("w"), local.read(0, 30))
        np.testing.assert_array_equal(ps.pull("w", [0, 7, 7]), local.pull(np.array([0, 7, 7])))
        assert ps.table_info("w")["optimizer"]["catchup_decay"] is True
        with pytest.raises(ParamServerError, match="needs momentum 0"):
            ps.set_optimizer("w", lr=0.5, momentum=0.9, weight_decay=0.1, catchup_decay=True)
        np.testing.assert_array_equal(ps.read_all("w"), local.read(0, 30))
