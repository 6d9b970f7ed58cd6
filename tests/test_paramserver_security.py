"""Issue 25, server part: a hostile client against real server processes on loopback ports.

Must show 1 (the file system: only the snapshot folder), 2 (bounded memory: headers,
replies nobody reads, tables), 6 (worker ids belong to connections; routing ids; idle
connections), and every server flag misuse exits 2 with one line. Must show 3 and 4 (what a
restore may change, bad snapshot files) are in ``test_paramserver_security_files.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import zmq

from paramserver import ParamClient, ParamServerError
from tests.ps_utils import SERVER_SCRIPT, running_server, server_log

pytestmark = pytest.mark.timeout(180)
MIB = 1 << 20


@contextlib.contextmanager
def dealer(addr: str, **options):
    """A raw DEALER socket (``options``: ZeroMQ socket options by name, e.g. RCVHWM=1)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 10_000
    for name, value in options.items():
        s.setsockopt(getattr(zmq, name), value)
    s.connect(addr)
    try:
        yield s
    finally:
        s.close()
        ctx.term()


def call(s: zmq.Socket, header: dict | bytes, *frames: bytes) -> dict:
    s.send_multipart([b"", header if isinstance(header, bytes) else json.dumps(header).encode(),
                      *frames])
    return json.loads(s.recv_multipart()[1])


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def peak_rss(proc) -> int:
    """The process's peak resident size so far (Linux ``VmHWM``), else its current one."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return rss(proc)


def answers_at_once(ps: ParamClient) -> None:
    t0 = time.monotonic()
    ps.ping()
    assert time.monotonic() - t0 < 1.0


# ------------------------------------------------------- must show 1: one folder only
def test_snapshot_restore_and_delete_stay_inside_the_snapshot_folder(tmp_path):
    folder, outside = tmp_path / "snaps", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    (folder / "escape").symlink_to(outside)              # a folder link leaving the folder
    (folder / "link").symlink_to(victim)                 # a file link leaving it
    os.mkfifo(folder / "fifo")
    (folder / "notes.txt").write_text("not a snapshot")
    refused = {  # path -> what the error says
        str(victim): "is absolute", "../outside/victim": "holds '..'",
        "sub/../../outside/victim": "holds '..'", "escape/victim": "symbolic link",
        "link": "symbolic link", "fifo": "FIFO", "/dev/stdin": "is absolute", "": "names no file",
    }
    with running_server("--snapshot-dir", str(folder)) as (proc, addr), \
            ParamClient(addr, timeout_s=5) as ps:
        ps.create_table("w", 50, 4, seed=1)
        for path, why in refused.items():
            for op in (ps.snapshot, ps.restore, ps.delete_snapshot):
                t0 = time.monotonic()
                with pytest.raises(ParamServerError, match=why):
                    op(path)
                assert time.monotonic() - t0 < 2.0, (op, path)  # a FIFO never blocks
                answers_at_once(ps)
        with pytest.raises(ParamServerError, match="removes only snapshot files"):
            ps.delete_snapshot("notes.txt")
        # a real snapshot in a sub-folder: written, restored, deleted
        assert ps.snapshot("run1/rows")[0]["path"] == "run1/rows"
        ps.restore("./run1//rows")
        assert ps.delete_snapshot("run1/rows")[0]["bytes"] > 0
        with pytest.raises(ParamServerError, match="not found"):
            ps.restore("run1/rows")
        assert ps.ping()[0]["snapshot_dir"] == str(folder.resolve())
    assert victim.read_bytes() == b"precious"
    assert os.listdir(outside) == ["victim"]
    assert sorted(os.listdir(folder)) == ["escape", "fifo", "link", "notes.txt", "run1"]
    assert (folder / "fifo").is_fifo() and (folder / "notes.txt").read_text() == "not a snapshot"
    assert "Traceback" not in server_log(proc)


def test_default_snapshot_folder_is_created_in_the_working_directory(tmp_path):
    ready = tmp_path / "address"
    proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "--bind", "tcp://127.0.0.1:*",
                             "--ready-file", str(ready)], cwd=str(tmp_path),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        with ParamClient(ready.read_text().strip(), timeout_s=5) as ps:
            ps.create_table("w", 5, 2)
            ps.snapshot("a")
        assert (tmp_path / "paramserver-snapshots" / "a").is_file()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# ------------------------------------------------------------ must show 2: memory
def test_header_of_nested_lists_is_refused_without_growing_the_server():
    header = b'{"op": "ping", "x": [' + b"[], " * (8 * MIB // 4) + b"[]]}"  # 8 MiB
    with running_server() as (proc, addr), dealer(addr) as s:
        assert call(s, {"op": "ping"})["ok"]
        before, peak_before = rss(proc), peak_rss(proc)
        for _ in range(4):
            reply = call(s, header)
            assert not reply["ok"] and "exceeds the limit of 65536 bytes" in reply["error"]
        grown, peak = rss(proc) - before, peak_rss(proc) - peak_before
        print(f"RSS growth after four 8 MiB headers: {grown / MIB:.1f} MiB, peak "
              f"{peak / MIB:.1f} MiB")
        assert grown < 2 * len(header) and peak < 2 * len(header), (grown, peak)
        # Under the cap: nesting is refused before parsing, unknown fields are not echoed.
        deep = b'{"op": "ping", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        reply = call(s, deep)
        assert not reply["ok"] and "nests 5001 levels" in reply["error"]
        many = {"op": "ping", **{f"field{i:05d}" + "x" * 40: 1 for i in range(1000)}}
        reply = call(s, json.dumps(many).encode())
        assert not reply["ok"] and "and 997 more" in reply["error"]
        assert len(reply["error"]) < 300, reply["error"]
        # A message of 200,000 empty frames: refused, no Python object per frame.
        before = peak_rss(proc)
        s.send_multipart([b""] * 200_000 + [b"{}"])
        reply = json.loads(s.recv_multipart()[1])
        assert not reply["ok"] and "message has 200001 frames" in reply["error"]
        peak = peak_rss(proc) - before
        print(f"peak RSS growth for a message of 200,000 empty frames: {peak / MIB:.1f} MiB")
        assert peak < 32 * MIB, peak
        assert call(s, {"op": "ping"})["ok"]
    log = server_log(proc)
    assert "field00999" not in log and len(log) < 20_000


def test_table_names_must_match_whole():
    with running_server() as (_, addr), ParamClient(addr, timeout_s=10) as ps:
        for bad in ("w\n", "w/../x", "", "x" * 129, "a b"):
            with pytest.raises(ParamServerError, match="must be 1-128 letters"):
                ps.create_table(bad, 5, 2)
        assert ps.create_table("w.1_-x", 5, 2) and ps.ping()[0]["tables"] == {"w.1_-x": 0}


def test_a_client_that_never_reads_replies_does_not_grow_the_server():
    """400 pulls of 1 MiB each, replies never read: the server keeps 8 replies in ZeroMQ
    plus --max-queued-bytes (16 MiB), then mutes the connection (logged); others are still
    served. Without the bound the server would hold ~400 MiB."""
    rows, dim = 4096, 64  # a full pull: 1 MiB
    with running_server("--max-queued-bytes", str(16 * MIB)) as (proc, addr), \
            ParamClient(addr, timeout_s=10) as ps:
        ps.create_table("w", rows, dim, seed=1)
        ids = np.arange(rows, dtype="<i8")
        assert ps.pull("w", ids).shape == (rows, dim)
        before, peak_before = rss(proc), peak_rss(proc)
        pull = json.dumps({"op": "pull", "table": "w",
                           "arrays": [{"dtype": "int64", "shape": [rows]}]}).encode()
        with dealer(addr, RCVHWM=1, RCVBUF=64 * 1024) as s:
            for _ in range(400):
                s.send_multipart([b"", pull, ids.tobytes()])
            deadline = time.monotonic() + 60
            while "does not read its replies" not in server_log(proc):
                assert time.monotonic() < deadline, server_log(proc)[-2000:]
                time.sleep(0.1)
            time.sleep(1.0)  # let the server read the rest of the pulls
            grown, peak = rss(proc) - before, peak_rss(proc) - peak_before
            answers_at_once(ps)
        print(f"RSS growth with a client that never reads (400 x 1 MiB replies): "
              f"{grown / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB")
        assert grown < 64 * MIB and peak < 64 * MIB, (grown, peak)
        assert ps.pull("w", [0, 1]).shape == (2, dim)


def test_a_table_that_does_not_fit_in_available_memory_is_refused():
    rows, dim = 10_000_000, 65536
    with running_server() as (_, addr), ParamClient(addr, timeout_s=10) as ps:
        with pytest.raises(ParamServerError,
                           match=rf"table 'huge' \({rows} rows x {dim}\) needs "
                                 rf"{8 * rows * dim / 2**30:.2f} GiB .* available"):
            ps.create_table("huge", rows, dim)
        assert ps.ping()[0]["tables"] == {}


def test_memory_check_counts_the_pages_existing_tables_have_yet_to_fill(monkeypatch):
    """Tables whose pages are not resident yet (zero momentum) still count: two tables that
    each fit the available memory alone are refused together."""
    from paramserver import limits

    class VM:
        total, available = 64 * 2**30, 40 * 2**30

    class Proc:
        def memory_info(self):
            return type("M", (), {"rss": 2 * 2**30})()

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    monkeypatch.setattr(psutil, "Process", Proc)
    assert limits.memory_shortfall(30 * 2**30, 0, "a") is None
    # 30 GiB held, 2 GiB of it resident: 28 GiB still to come + 30 GiB new > 40 - 3.2 GiB.
    why = limits.memory_shortfall(30 * 2**30, 30 * 2**30, "table 'b'")
    assert why.startswith("table 'b' needs 30.00 GiB") and "28.00 GiB more" in why, why
    assert "36.80 GiB is available" in why and "3.20 GiB margin" in why


# ------------------------------------------------------------- must show 6: identity
def test_worker_ids_belong_to_the_connection_that_claimed_them():
    with running_server("--workers", "2", "--worker-timeout", "30") as (proc, addr):
        owner = ParamClient(addr, worker_id=0, timeout_s=10)
        ps = ParamClient(addr, worker_id=0, timeout_s=10)
        try:
            owner.create_table("w", 10, 2, init="zeros")
            assert owner.register() == [0, 1]
            before = owner.table_info("w", checksum=True)["shards"][0]
            with pytest.raises(ParamServerError, match="worker 0 belongs to another connection"):
                ps.push("w", [1], np.ones((1, 2)))
            with pytest.raises(ParamServerError, match="worker 0 belongs to another connection"):
                ps.register()
            after = owner.table_info("w", checksum=True)["shards"][0]
            assert after["checksum"] == before["checksum"] and after["pending"] is None
            for wid in (2, 7, 2**31 - 1):  # no phantom workers
                with ParamClient(addr, worker_id=wid, timeout_s=10) as phantom:
                    with pytest.raises(ParamServerError, match=r"not one of this server's "
                                                               r"workers 0\.\.1"):
                        phantom.register()
                    with pytest.raises(ParamServerError, match="not one of"):
                        phantom.push("w", [1], np.ones((1, 2)))
            assert ps.ping()[0]["workers"] == [0, 1]
            owner.close()  # its connection closes: worker 0 is free for another one
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert ps.register() == [0, 1]
                    break
                except ParamServerError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        finally:
            owner.close()
            ps.close()
    assert "worker id(s) [0] are free" in server_log(proc)


def test_a_reused_routing_id_never_receives_another_clients_replies():
    """Client A (routing id b"dup") waits for its push reply; client B connects with the same
    routing id. B is not served while A is connected, and A gets its own reply."""
    with running_server("--workers", "2", "--worker-timeout", "30") as (_, addr):
        with ParamClient(addr, worker_id=1, timeout_s=10) as w1:
            w1.create_table("w", 10, 2, init="zeros")
            push = {"op": "push", "table": "w", "worker": 0, "step": 1, "id": "a-push",
                    "arrays": [{"dtype": "int64", "shape": [1]},
                               {"dtype": "float32", "shape": [1, 2]}]}
            with dealer(addr, ROUTING_ID=b"dup") as a:
                a.send_multipart([b"", json.dumps(push).encode(), np.array([3], "<i8").tobytes(),
                                  np.ones((1, 2), "<f4").tobytes()])
                deadline = time.monotonic() + 10
                while w1.table_info("w")["shards"][0]["pending"] is None:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                with dealer(addr, ROUTING_ID=b"dup", RCVTIMEO=1000) as b:
                    b.send_multipart([b"", json.dumps({"op": "ping", "id": "b-ping"}).encode()])
                    time.sleep(0.3)
                    assert w1.push("w", [4], np.ones((1, 2))) == 1  # completes A's step
                    reply = json.loads(a.recv_multipart()[1])
                    assert reply == {"ok": True, "id": "a-push", "step": 1, "workers": [0, 1]}
                    with pytest.raises(zmq.Again):
                        b.recv_multipart()  # nothing for B: not A's reply, not its own


def _low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_300_idle_connections_do_not_starve_the_server():
    """The server starts with a soft open-file limit of 256 (where 300 idle connections
    used to exhaust it) and raises it to the hard limit, so a new client is served at once
    while 300 idle TCP connections and 20 idle ZeroMQ peers are open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"hard open-file limit {hard} leaves no room for 300 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test holds 300 sockets
    held: list[socket.socket] = []
    try:
        with running_server(preexec_fn=_low_fd_limit) as (proc, addr), \
                contextlib.ExitStack() as idle:
            with ParamClient(addr, timeout_s=5) as ps:
                ps.create_table("w", 10, 2)
            host, port = addr[len("tcp://"):].rsplit(":", 1)
            held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(300)]
            for _ in range(20):
                idle.enter_context(dealer(addr))
            time.sleep(0.5)
            t0 = time.monotonic()
            with ParamClient(addr, timeout_s=2) as ps:
                assert ps.pull("w", [1]).shape == (1, 2)
            elapsed = time.monotonic() - t0
            print(f"new client's pull with 300 idle connections open: {elapsed * 1000:.1f} ms")
            assert elapsed < 2.0
            assert psutil.Process(proc.pid).num_fds() > 300
    finally:
        for c in held:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_connections_that_never_speak_zeromq_are_closed_after_the_handshake_timeout():
    from paramserver import limits

    with running_server() as (_, addr):
        host, port = addr[len("tcp://"):].rsplit(":", 1)
        conns = [socket.create_connection((host, int(port)), timeout=limits.HANDSHAKE_S + 10)
                 for _ in range(5)]
        try:
            t0 = time.monotonic()
            for c in conns:
                while c.recv(4096):  # the server's greeting, then EOF when it closes
                    pass
            assert limits.HANDSHAKE_S - 1 < time.monotonic() - t0 < limits.HANDSHAKE_S + 10
        finally:
            for c in conns:
                c.close()


# ------------------------------------------------------------ flags: exit 2, one line
@pytest.mark.parametrize("flags", [
    ["--workers", "0"], ["--workers", "-1"], ["--workers", "5000"], ["--workers", "two"],
    ["--worker-timeout", "inf"], ["--worker-timeout", "nan"], ["--worker-timeout", "0"],
    ["--worker-timeout", "-5"], ["--worker-timeout", "1e9"],
    ["--max-message-bytes", "0"], ["--max-message-bytes", "-1"],
    ["--max-message-bytes", str(1 << 40)], ["--max-message-bytes", "1e9"],
    ["--max-header-bytes", "10"], ["--max-header-bytes", str(64 * MIB)],
    ["--max-header-bytes", str(MIB), "--max-message-bytes", str(8 * MIB)],
    ["--max-queued-bytes", "0"], ["--stats-interval", "-1"], ["--stats-interval", "nan"],
    ["--snapshot-dir", "{file}"], ["--snapshot-dir", "{file}/sub"],
    ["--restore", "{missing}"], ["--restore", "/dev/null"], ["--restore", "{fifo}"],
    ["--restore", "{file}"], ["--bind", "nonsense"],
    ["--curve-secret-key", "{missing}", "--curve-public-keys-dir", "{dir}"],
    ["--log-level", "LOUD"],
], ids=lambda f: " ".join(f))
def test_flag_misuse_exits_2_with_one_line(flags, tmp_path):
    (tmp_path / "file").write_text("not a snapshot")
    os.mkfifo(tmp_path / "fifo")
    args = [f.format(file=tmp_path / "file", missing=tmp_path / "missing",
                     fifo=tmp_path / "fifo", dir=tmp_path) for f in flags]
    if "--snapshot-dir" not in flags:
        args += ["--snapshot-dir", str(tmp_path / "snaps")]
    if "--bind" not in flags:
        args += ["--bind", "tcp://127.0.0.1:*"]
    out = subprocess.run([sys.executable, str(SERVER_SCRIPT), *args], capture_output=True,
                         text=True, timeout=60)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, lines)
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    print(lines[0])
