"""Must show 5 (a worker killed mid-step) and 6 (kill -9 of the server during a snapshot),
with real processes and real signals."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from paramserver import ParamClient, SGDConfig, Table
from paramserver.snapshot import (read_snapshot, remove_stale_temp_files, temp_prefix,
                                  write_snapshot)
from tests.ps_utils import ROOT, running_server, server_log, start_server, stop_server

pytestmark = pytest.mark.timeout(180)

N, D = 40, 8

# A worker process: pushes steps 1..mid-1, then at step `mid` pulls and waits to be killed.
WORKER = """
import sys, time, numpy as np
from paramserver import ParamClient
addr, wid, mid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with ParamClient(addr, worker_id=wid, timeout_s=60) as ps:
    for step in range(1, mid + 1):
        ps.pull("w", np.arange(10))
        if step == mid:
            print("MID", flush=True)
            time.sleep(600)
        g = np.random.default_rng([wid, step]).standard_normal((10, %d)).astype(np.float32)
        ps.push("w", np.arange(10) + 5 * wid, g)
        print("PUSHED", step, flush=True)
""" % D


def _grad(wid: int, step: int) -> np.ndarray:
    return np.random.default_rng([wid, step]).standard_normal((10, D)).astype(np.float32)


def test_worker_killed_mid_step_survivor_continues_after_timeout():
    with running_server("--workers", "2", "--worker-timeout", "1.5") as (proc, addr):
        with ParamClient(addr, worker_id=0, timeout_s=30) as ps:
            ps.create_table("w", N, D, seed=2)
            ps.set_optimizer("w", lr=0.1, momentum=0.9, weight_decay=1e-4)
            w0 = ps.read_all("w")
            other = subprocess.Popen([sys.executable, "-c", WORKER, addr, "1", "4"],
                                     stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
            try:
                for step in (1, 2, 3):  # each completes only once worker 1 pushed it too
                    assert ps.push("w", np.arange(10), _grad(0, step)) == step
                assert other.stdout.readline().strip() == "PUSHED 1"
                for line in ("PUSHED 2", "PUSHED 3", "MID"):
                    assert other.stdout.readline().strip() == line
                os.kill(other.pid, signal.SIGKILL)  # dies mid-step 4, holding no reply
                other.wait(10)
            finally:
                if other.poll() is None:
                    other.kill()
                    other.wait(10)
            # Step 4 waits for the timeout, then completes with worker 0 alone; 5 and 6 do
            # not wait for the dead worker any more.
            for step in (4, 5, 6):
                assert ps.push("w", np.arange(10), _grad(0, step)) == step
            got = ps.read_all("w")
            assert ps.ping()[0]["workers"] == [0]

    log = server_log(proc)
    assert log.count("worker 1 dropped") == 1, log
    assert "step 4" in log.split("worker 1 dropped")[1].splitlines()[0]
    # Reference: steps 1-3 average both workers' gradients, steps 4-6 use worker 0's only.
    ref = Table("w", N, D, weight=w0.copy(), optim=SGDConfig(lr=0.1, momentum=0.9,
                                                               weight_decay=1e-4))
    for step in (1, 2, 3):
        ref.apply_grad(np.r_[np.arange(10), np.arange(10) + 5],
                       np.concatenate([_grad(0, step), _grad(1, step)]) / np.float32(2))
    for step in (4, 5, 6):
        ref.apply_grad(np.arange(10), _grad(0, step))
    np.testing.assert_allclose(got, ref.weight, rtol=1e-6, atol=1e-7)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kill_9_during_snapshot_keeps_previous_snapshot(tmp_path):
    """The snapshot file is replaced atomically: a server killed while writing leaves the
    previous snapshot intact and restorable. The temp file it leaves names the dead pid, and
    a server restarted on the folder removes it (logged), keeping other files."""
    rows, dim = 300_000, 128  # ~300 MB of weights + momentum: the write takes a while
    snap = tmp_path / "ps.safetensors"
    proc, addr = start_server("--snapshot-dir", str(tmp_path))
    try:
        with ParamClient(addr, timeout_s=60) as ps:
            ps.create_table("big", rows, dim, init="normal", std=0.01, seed=1)
            ps.set_optimizer("big", lr=0.1, momentum=0.9)
            ps.push("big", np.arange(0, rows, 1000), np.ones((rows // 1000, dim), np.float32))
            ps.snapshot(snap.name)
            first_hash = _sha(snap)
            first = ps.pull("big", np.arange(0, rows, 997))
            ps.push("big", np.arange(0, rows, 1000), np.ones((rows // 1000, dim), np.float32))
            # Ask for a second snapshot without waiting; kill -9 as soon as its temp file
            # appears (mid-write).
            import zmq
            from paramserver.wire import encode
            ctx = zmq.Context()
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(addr)
            s.send_multipart([b""] + encode({"op": "snapshot", "path": snap.name}))
            deadline = time.monotonic() + 30
            tmp_seen = []
            while time.monotonic() < deadline and not tmp_seen:
                tmp_seen = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            s.close()
            ctx.term()
        assert tmp_seen, "snapshot temp file never appeared"
        assert proc.returncode == -signal.SIGKILL
        assert _sha(snap) == first_hash  # the previous snapshot is untouched
    finally:
        stop_server(proc)
    leftover = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(leftover) == 1 and leftover[0].startswith(f".ps.safetensors.{proc.pid}@"), \
        leftover
    # Files the clean-up must keep: a temp file of a live process (this test's), and files
    # not named like a snapshot temp file.
    live = tmp_path / f"{temp_prefix('ps.safetensors')}abcd1234.tmp"
    others = [live, tmp_path / ".notes.tmp", tmp_path / f".ps.safetensors.{proc.pid}.tmp"]
    for p in others:
        p.write_bytes(b"x")

    with running_server("--snapshot-dir", str(tmp_path), "--restore", snap.name) as (proc2,
                                                                                     addr2):
        with ParamClient(addr2, timeout_s=60) as ps:
            info = ps.table_info("big")
            assert info["step"] == 1 and info["optimizer"]["momentum"] == 0.9
            np.testing.assert_array_equal(ps.pull("big", np.arange(0, rows, 997)), first)
    log = server_log(proc2)
    assert "restored 1 table" in log
    assert f"removed stale snapshot temp file {tmp_path / leftover[0]}" in log, log
    assert sorted(os.listdir(tmp_path)) == sorted([snap.name] + [p.name for p in others])


def test_remove_stale_temp_files_keeps_live_writers_and_foreign_files(tmp_path):
    """Only temp files of this host whose writer pid is gone are removed."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)  # reaped: no process has this pid now
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = temp_prefix("x").split("@")[1].rstrip(".")
        names = {
            "dead": f".snap.st.{gone.pid}@{host}.k2j_3h4g.tmp",
            "dead_shard": f".snap.st.00001-of-00003.{gone.pid}@{host}.abcdefgh.tmp",
            "alive": f".snap.st.{alive.pid}@{host}.abcdefgh.tmp",
            "own": f"{temp_prefix('snap.st')}abcdefgh.tmp",
            "other_host": f".snap.st.{gone.pid}@{host}x-other.abcdefgh.tmp",
            "no_pid": ".snap.st.abcdefgh.tmp",   # the name format before pids
            "not_temp": f".snap.st.{gone.pid}@{host}.abcdefgh.tmp.bak",
            "snapshot": "snap.st",
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"partial")
        removed = remove_stale_temp_files(tmp_path)
        assert sorted(p.name for p in removed) == sorted([names["dead"], names["dead_shard"]])
        assert sorted(os.listdir(tmp_path)) == sorted(
            n for k, n in names.items() if k not in ("dead", "dead_shard"))
        # A server starting up writes nothing yet: a file with its own pid is a leftover.
        assert [p.name for p in remove_stale_temp_files(tmp_path, own_pid_is_stale=True)] \
            == [names["own"]]
        assert (tmp_path / names["alive"]).exists()
        assert remove_stale_temp_files(tmp_path / "missing") == []
    finally:
        alive.kill()
        alive.wait(30)
    # Once its writer is gone, the file of the formerly live pid goes with the next write.
    write_snapshot(tmp_path / "snap.st", {"w": Table("w", 3, 2)})
    assert not (tmp_path / names["alive"]).exists()
    assert read_snapshot(tmp_path / "snap.st")[0]["w"].num_rows == 3


def test_completed_snapshot_restores_to_identical_bytes(tmp_path):
    from safetensors import safe_open

    a, b, c = tmp_path / "a.st", tmp_path / "b.st", tmp_path / "c.st"
    folder = ("--snapshot-dir", str(tmp_path))
    with running_server(*folder) as (_, addr), ParamClient(addr, timeout_s=30) as ps:
        ps.create_table("w", 1000, 16, init="uniform", std=0.1, seed=3)
        ps.create_table("bias", 1000, 1, init="zeros")
        ps.set_optimizer("w", lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        rng = np.random.default_rng(0)
        for _ in range(3):
            r = rng.integers(0, 1000, 64)
            ps.push("w", r, rng.standard_normal((64, 16)).astype(np.float32))
            ps.push("bias", r, rng.standard_normal((64, 1)).astype(np.float32))
        ps.snapshot(a.name)
        weights = ps.read_all("w")
        momentum = ps.read_all("w", field="momentum")

    # Restore via the --restore flag (an absolute path: the operator's) into a fresh process ...
    with running_server(*folder, "--restore", str(a)) as (_, addr), ParamClient(addr) as ps:
        ps.snapshot(b.name)
        np.testing.assert_array_equal(ps.read_all("w"), weights)
        info = ps.table_info("w")
        assert info["step"] == 3 and info["optimizer"] == {
            "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "renorm": 0.0,
            "max_norm": 0.0, "catchup_decay": False}
        # ... and the next step continues exactly where the original would have.
    # ... and via the restore op into another fresh process.
    with running_server(*folder) as (_, addr), ParamClient(addr) as ps:
        ps.create_table("other", 5, 2)  # not in the file: left as it is by the restore
        ps.restore(a.name)
        assert ps.ping()[0]["tables"] == {"other": 0, "w": 3, "bias": 3}
        ps.snapshot(c.name, tables=["w", "bias"])
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert oct(a.stat().st_mode & 0o777) == "0o644"  # not mkstemp's 0600
    # The format is plain safetensors, readable (memory-mapped) by the safetensors library.
    with safe_open(str(a), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("w/weight"), weights)
        np.testing.assert_array_equal(f.get_tensor("w/momentum"), momentum)
        assert f.metadata()["format"] == "hfsoftmax-paramserver-snapshot"


def test_bad_snapshot_files_are_refused(tmp_path):
    junk = tmp_path / "junk.st"
    junk.write_bytes(os.urandom(1000))
    trunc = tmp_path / "trunc.st"
    with running_server("--snapshot-dir", str(tmp_path)) as (_, addr), ParamClient(addr) as ps:
        ps.create_table("w", 100, 4)
        ps.snapshot("good.st")
        trunc.write_bytes((tmp_path / "good.st").read_bytes()[:-17])
        before = ps.table_info("w", checksum=True)["shards"][0]["checksum"]
        from paramserver import ParamServerError
        for bad in (junk, trunc, tmp_path / "missing.st"):
            with pytest.raises(ParamServerError, match=str(bad.name)):
                ps.restore(bad.name)
        assert ps.table_info("w", checksum=True)["shards"][0]["checksum"] == before
