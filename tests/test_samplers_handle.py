"""The pieces of a sampler: Index backends, the in-process IndexHandle, the index process's
wire messages over its pipe, ProcessIndexHandle's status replies, and the selector around
them (``random`` without an index, backend options read through).

Real components: exact and hnswlib backends, a real index process; the child's serve loop is
also driven directly over a socketpair with raw ``paramserver/wire.py`` frames.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

import numpy as np
import pytest
import torch

from hfsoftmax.samplers import (ClassSampler, IndexHandle, IndexStatus, NpyRowSource,
                                ProcessIndexHandle, build_index, build_sampler,
                                index_backends)
from hfsoftmax.samplers import pipe
from hfsoftmax.samplers.exact import ExactIndex
from hfsoftmax.samplers.index import Index
from hfsoftmax.samplers.synthetic import clustered_rows, queries_near
from paramserver import wire

torch.set_num_threads(1)
N, D = 500, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exact_ids(x, rows, k):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    rn = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return np.argsort(-(xn @ rn.T), axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------------- Index, IndexHandle
def test_index_base_names_what_a_backend_must_implement():
    idx = Index(N, D)
    with pytest.raises(NotImplementedError, match="does not implement build"):
        idx.build(np.zeros((N, D), np.float32))
    with pytest.raises(NotImplementedError, match="fresh_rows needs"):
        idx.search(None, np.zeros((1, D), np.float32), 3)  # search defaults to search_scored
    assert ExactIndex(N, D, metric="ip", mips="augment").mips == "native"  # raw matmul
    with pytest.raises(TypeError, match="bogus"):
        build_index("exact", N, D, bogus=1)
    with pytest.raises(ValueError, match="Unknown index backend 'random'"):
        build_index("random", N, D)
    assert index_backends() == ["annoy", "exact", "faiss", "hnsw"]


def test_index_handle_builds_swaps_and_reports_its_status():
    rows = clustered_rows(N, D, seed=0)
    handle = IndexHandle(ExactIndex(N, D, metric="cosine"))
    assert handle.status() == IndexStatus() and not handle.has_index
    with pytest.raises(RuntimeError, match="exact sampler has no index yet"):
        handle.search(rows[:2], 3)
    assert handle.rebuild(rows, step=4) >= 0
    st = handle.status()
    assert (st.has_index, st.index_step, st.rebuilding, st.rebuilds) == (True, 4, False, 1)
    assert st.last_rebuild_s >= st.last_read_s >= 0
    x, _ = queries_near(rows, 8, seed=1)
    np.testing.assert_array_equal(handle.search(x, 5), exact_ids(x, rows, 5))
    ids, scores = handle.search(x, 5, scored=True)
    np.testing.assert_array_equal(ids, exact_ids(x, rows, 5))
    assert np.all(np.diff(scores, axis=1) <= 0)

    # a failed background rebuild: kept for the training thread, the old index still answers
    def broken():
        raise OSError("row store unreachable")

    assert handle.start_rebuild(broken, step=9) and handle.join(30)
    err = handle.take_error()
    assert isinstance(err, OSError) and handle.take_error() is None
    assert handle.status().index_step == 4 and handle.search(x, 1).shape == (8, 1)
    assert handle.start_rebuild(broken, step=10) and handle.join(30)
    with pytest.raises(RuntimeError, match="background index rebuild failed.*unreachable"):
        handle.wait()
    handle.close()
    assert not handle.has_index and handle.index_step is None
    with pytest.raises(TypeError, match="holds an Index backend"):
        IndexHandle("exact")


# ---------------------------------------------------------------------- the pipe
def _pair():
    a, b = socket.socketpair()
    return Connection(a.detach()), Connection(b.detach())


def test_pipe_frames_are_the_wire_format():
    left, right = _pair()
    try:
        ids = np.arange(12, dtype=np.int64).reshape(3, 4)
        scores = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
        pipe.send(left, {"op": "query", "k": 4}, [ids, scores])
        # on the pipe: wire.encode's header frame, then the raw arrays, one frame each
        header_frame = right.recv_bytes()
        assert header_frame == wire.encode({"op": "query", "k": 4}, [ids, scores])[0]
        assert json.loads(header_frame)["arrays"] == [{"dtype": "int64", "shape": [3, 4]},
                                                      {"dtype": "float32", "shape": [3, 4]}]
        assert right.recv_bytes() == ids.tobytes() and right.recv_bytes() == scores.tobytes()
        # and back through recv: the same arrays, checked against the header
        pipe.send(left, {"ok": True}, [ids, scores])
        header, (a, b) = pipe.recv(right)
        assert header["ok"] is True
        np.testing.assert_array_equal(a, ids)
        np.testing.assert_array_equal(b, scores)
        pipe.send(left, {"op": "status"})
        assert pipe.recv(right) == ({"op": "status"}, [])
        for bad, match in ((b"not json", "not UTF-8 JSON"), (b"[1]", "JSON object"),
                           (json.dumps({"arrays": [{}] * 9}).encode(), "at most 8")):
            left.send_bytes(bad)
            with pytest.raises(wire.ProtocolError, match=match):
                pipe.recv(right)
        left.send_bytes(json.dumps({"arrays": [{"dtype": "int64", "shape": [2]}]}).encode())
        left.send_bytes(b"\0" * 8)  # one int64, not two
        with pytest.raises(wire.ProtocolError, match="needs 16 bytes"):
            pipe.recv(right)
    finally:
        left.close()
        right.close()
    err = pipe.remote_error(pipe.error_reply(KeyError("k")), "ctx", RuntimeError)
    assert isinstance(err, KeyError) and "ctx: KeyError" in str(err)
    err = pipe.remote_error({"type": "OSError", "error": "x"}, "ctx", ConnectionError)
    assert type(err) is ConnectionError


def test_index_process_serves_wire_messages(tmp_path):
    """The child's serve loop, driven over a socketpair with raw wire frames: every reply
    carries the handle's status; a bad request gets an error reply and it keeps serving."""
    from hfsoftmax.samplers._index_child import serve

    rows = clustered_rows(N, D, seed=2)
    path = tmp_path / "rows.npy"
    np.save(path, rows)
    parent, child = _pair()
    server = threading.Thread(target=serve, args=(child, os.getppid()), daemon=True)
    server.start()
    try:
        pipe.send(parent, {"op": "init", "name": "exact", "num_classes": N, "dim": D,
                           "opts": {"metric": "cosine"}})
        hello, _ = pipe.recv(parent)
        assert hello["ok"] and hello["pid"] == os.getpid() and hello["mips"] == "native"
        assert IndexStatus.from_dict(hello["status"]) == IndexStatus()
        pipe.send(parent, {"op": "rebuild", "step": 7,
                           "source": NpyRowSource(path, delete=True).to_dict()})
        reply, _ = pipe.recv(parent)
        assert reply["ok"] and reply["started"] is True
        pipe.send(parent, {"op": "wait", "timeout": 30})
        reply, _ = pipe.recv(parent)
        st = IndexStatus.from_dict(reply["status"])
        assert (st.has_index, st.index_step, st.rebuilds, st.rebuilding) == (True, 7, 1, False)
        assert reply["rebuild_error"] is None and not path.exists()  # delete=True
        x, _ = queries_near(rows, 6, seed=3)
        for frame in wire.encode({"op": "query", "k": 4, "scores": True}, [x]):
            parent.send_bytes(frame)
        header = json.loads(parent.recv_bytes())
        assert header["arrays"] == [{"dtype": "int64", "shape": [6, 4]},
                                    {"dtype": "float32", "shape": [6, 4]}]
        ids = np.frombuffer(parent.recv_bytes(), dtype=np.int64).reshape(6, 4)
        parent.recv_bytes()  # the scores
        np.testing.assert_array_equal(ids, exact_ids(x, rows, 4))
        pipe.send(parent, {"op": "bogus"})
        reply, _ = pipe.recv(parent)
        assert not reply["ok"] and reply["type"] == "ValueError" and "bogus" in reply["error"]
        assert IndexStatus.from_dict(reply["status"]).has_index
        parent.send_bytes(b"{not json")
        reply, _ = pipe.recv(parent)
        assert not reply["ok"] and reply["type"] == "ProtocolError"
        pipe.send(parent, {"op": "close"})
        assert pipe.recv(parent)[0]["ok"]
        server.join(30)
        assert not server.is_alive()
    finally:
        parent.close()
        child.close()


# ---------------------------------------------------------------------- ProcessIndexHandle
def test_process_handle_state_is_the_childs_status_reply(tmp_path):
    rows = clustered_rows(N, D, seed=4)
    handle = ProcessIndexHandle("exact", N, D, metric="cosine", threads=1)
    local = IndexHandle(ExactIndex(N, D, metric="cosine"))
    try:
        assert handle.alive and handle.pid != os.getpid() and handle.mips == "native"
        assert handle.status() == IndexStatus() and not handle.has_index
        with pytest.raises(RuntimeError, match="exact-process sampler has no index yet"):
            handle.search(rows[:2], 3)
        assert handle.rebuild(rows, step=3) >= 0  # staged through a temporary .npy
        local.rebuild(rows, step=3)
        st = handle.status()
        assert isinstance(st, IndexStatus)
        assert (st.has_index, st.index_step, st.rebuilds, st.rebuilding) == (True, 3, 1, False)
        assert handle.last_rebuild_s == st.last_rebuild_s is not None
        x, _ = queries_near(rows, 10, seed=5)
        np.testing.assert_array_equal(handle.search(x, 6), local.search(x, 6))
        for a, b in zip(handle.search(x, 6, scored=True), local.search(x, 6, scored=True)):
            np.testing.assert_array_equal(a, b)
        assert set(handle.stats()) == {"index_pid", "index_rss_mb"}
        # a rebuild failing in the child arrives with a reply, and is raised once here
        bad = tmp_path / "bad.npy"
        np.save(bad, np.zeros((N, D + 1), np.float32))
        assert handle.start_rebuild(NpyRowSource(bad), step=8)
        with pytest.raises(RuntimeError, match=r"rebuild in the index process failed.*shape"):
            handle.wait(60)
        handle.raise_error()  # once only
        assert handle.status().index_step == 3 and handle.search(x, 2).shape == (10, 2)
    finally:
        handle.close()
    assert not handle.alive and not handle.has_index and not handle.rebuilding
    with pytest.raises(RuntimeError, match="closed"):
        handle.status()


def test_index_process_modules_stay_torch_free():
    code = ("import sys, numpy as np\n"
            "import hfsoftmax.samplers._index_child\n"
            "from hfsoftmax.samplers import IndexHandle, build_index\n"
            "h = IndexHandle(build_index('hnsw', 200, 8, metric='cosine', num_threads=1))\n"
            "h.rebuild(np.random.default_rng(0).random((200, 8), dtype=np.float32), 0)\n"
            "assert h.search(np.ones((2, 8), np.float32), 3).shape == (2, 3)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- the selector
def test_selector_over_no_index_and_backend_options_read_through():
    rnd = build_sampler("random", N, D, seed=1, fresh_rows=10)
    assert rnd.index is None and rnd.fresh is None and rnd.name == "random"
    assert not rnd.needs_index and rnd.wait_rebuild() and rnd.rebuild(np.zeros((N, D))) == 0.0
    assert not rnd.start_rebuild(np.zeros((N, D))) and rnd.stats()["rebuilds"] == 0
    with pytest.raises(RuntimeError, match="random sampler has no nearest-class index"):
        rnd.query(np.zeros((1, D), np.float32), 3)
    s = build_sampler("faiss", N, D, nprobe=3)
    assert s.nprobe == 3 and s.index.backend.nprobe == 3 and s.name == "faiss"
    assert getattr(s, "pid", None) is None  # benchmarks tell process mode by a pid
    with pytest.raises(AttributeError, match="no attribute 'nprobes'"):
        s.nprobes
    with pytest.raises(ValueError, match="the index is for 500 x 16 rows"):
        ClassSampler(N, D + 1, index=ExactIndex(N, D))
    with pytest.raises(ValueError, match="interval must be a positive"):
        build_sampler("exact", N, D, interval=0, process=True)  # before any child starts
