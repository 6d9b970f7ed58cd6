"""The index in its own process (``build_sampler(..., process=True)``): same selection as in
process, rebuilds read the rows from the parameter server in the child, steps never wait for
a rebuild, no orphan processes, child errors surface in the trainer.

Real components: a parameter-server process (``tests.ps_utils``), real hnswlib / torch
backends in a real index process. The slow rebuild is gated by a FIFO (the child blocks
reading it until the test writes the rows): no timing thresholds.
"""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import torch

from hfsoftmax.heads import SampledHead
from hfsoftmax.rowstore import ParamRowSource, RemoteRowStore, SGDConfig
from hfsoftmax.samplers import IndexProcessError, NpyRowSource, ProcessSampler, build_sampler
from hfsoftmax.samplers.synthetic import clustered_rows, queries_near
from paramserver import ParamClient
from tests.ps_utils import running_server

torch.set_num_threads(1)
N, D = 2000, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server():
    with running_server() as (_, address):
        yield address


@pytest.fixture
def store(server, request):
    client = ParamClient(server, timeout_s=30)
    table = f"t_{request.node.name}".replace("[", "_").replace("]", "")[:60]
    s = RemoteRowStore(client, table, N, D, SGDConfig(lr=0.5), seed=0, own_client=True)
    s.set_rows(np.arange(N), clustered_rows(N, D, seed=0))
    yield s
    s.close()


class NoLocalRead:
    """A reader that only says where the rows are: calling it (reading the rows into the
    trainer) fails the test."""

    def __init__(self, source):
        self.row_source = source

    def __call__(self):
        raise AssertionError("the trainer read the rows; the index process should have")


def _children_pids():
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("backend,opts", [("exact", {}), ("hnsw", {"num_threads": 1})])
def test_same_neighbours_and_selection_as_in_process(store, backend, opts):
    rows = store.read_all()
    inproc = build_sampler(backend, N, D, metric="cosine", seed=3, **opts)
    inproc.rebuild(rows, 0)
    proc = build_sampler(backend, N, D, metric="cosine", seed=3, process=True, threads=1,
                         **opts)
    try:
        assert isinstance(proc, ProcessSampler) and proc.alive
        assert proc.rebuild(NoLocalRead(store.row_source()), 0) >= 0
        assert proc.has_index and proc.index_age == 0 and proc.rebuilds == 1
        x, labels = queries_near(rows, 64, seed=5)
        assert np.array_equal(proc.query(x, 10), inproc.query(x, 10))
        for i in range(3):  # same RNG stream too: identical selections step after step
            xb = torch.from_numpy(x[i * 16:(i + 1) * 16])
            yb = torch.from_numpy(labels[i * 16:(i + 1) * 16])
            ids_p, tgt_p = proc.select(xb, yb, 200)
            ids_i, tgt_i = inproc.select(xb, yb, 200)
            assert torch.equal(ids_p, ids_i) and torch.equal(tgt_p, tgt_i)
            assert proc.last_num_neighbours == inproc.last_num_neighbours > 0
            assert torch.equal(ids_p[tgt_p], yb)
    finally:
        proc.close()
        inproc.close()
    assert not proc.alive


def test_rebuild_in_child_reads_current_rows_from_server_and_head_trains(store):
    sampler = build_sampler("exact", N, D, metric="cosine", process=True, threads=1,
                            interval=5)
    head = SampledHead(store, sampler, sample_num=100, logit="cosface", s=16.0, m=0.1)
    try:
        # the head passes rowstore.reader(): it carries a row_source, so the child reads
        for step in range(6):
            x = torch.randn(8, D, requires_grad=True)
            out = head(x, torch.randint(0, N, (8,)))
            out.loss.backward()
            assert sampler.wait_rebuild(120)  # so that step 5's rebuild is not skipped
        st = head.stats()
        assert st["rebuilds"] == 2 and st["index_pid"] == sampler.pid
        assert st["index_age"] == 0 and st["rebuild_s"] is not None  # rows of step 5
        # push changes to the server: rows 0..9 move to where the queries point
        target = np.random.default_rng(9).standard_normal((10, D)).astype(np.float32)
        before = sampler.query(target, 1)[:, 0]
        assert not np.array_equal(before, np.arange(10))
        store.set_rows(np.arange(10), target * 5)
        assert sampler.start_rebuild(NoLocalRead(store.row_source()), 7)
        assert sampler.wait_rebuild(120)
        assert np.array_equal(sampler.query(target, 1)[:, 0], np.arange(10))
        ids, _ = sampler.select(torch.from_numpy(target), torch.full((10,), N - 1), 50)
        assert set(range(10)) <= set(ids[:11].tolist())  # label first, then the neighbours
    finally:
        sampler.close()


def _open_fifo_writer(path, timeout_s=60.0):
    """Open a FIFO for writing once the reader (the child's rebuild) has opened it."""
    deadline = time.monotonic() + timeout_s  # a hang guard, not a timing assertion
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_step_during_slow_rebuild_returns_before_it_finishes(tmp_path):
    old = clustered_rows(N, D, seed=1)
    new = clustered_rows(N, D, seed=2)
    sampler = build_sampler("exact", N, D, metric="cosine", process=True, threads=1,
                            interval=10)
    try:
        assert sampler.maybe_rebuild(0, old)  # an array: staged through a temporary file
        assert sampler.wait_rebuild(120) and sampler.index_age == 0
        fifo = tmp_path / "rows.fifo"
        os.mkfifo(fifo)
        assert sampler.maybe_rebuild(10, NpyRowSource(fifo))
        fd = _open_fifo_writer(fifo)  # returns once the child's rebuild is reading: started
        try:
            x = torch.from_numpy(new[:8] * 3)
            ids, remapped = sampler.select(x, torch.arange(8), 100)  # returns meanwhile
            assert sampler.rebuilding and sampler.index_age == 10  # still step 0's rows
            assert torch.equal(ids[remapped], torch.arange(8))
            xn = new[:8] / np.linalg.norm(new[:8], axis=1, keepdims=True)
            on = old / np.linalg.norm(old, axis=1, keepdims=True)
            assert np.array_equal(sampler.query(x, 1)[:, 0], np.argmax(xn @ on.T, axis=1))
            assert not sampler.maybe_rebuild(25, old)  # due, but one runs: not doubled
            buf = io.BytesIO()
            np.save(buf, new)
            os.set_blocking(fd, True)
            os.write(fd, buf.getvalue())
        finally:
            os.close(fd)  # EOF: the child's read ends, the build runs
        assert sampler.wait_rebuild(120) and not sampler.rebuilding
        assert np.array_equal(sampler.query(x, 1)[:, 0], np.arange(8))
        assert sampler.index_age == 15 and sampler.rebuilds == 2
    finally:
        sampler.close()


def test_close_leaves_no_process_and_errors_surface_in_the_parent(tmp_path):
    with pytest.raises(TypeError, match="faiss index process failed to start.*bogus_option"):
        build_sampler("faiss", N, D, process=True, bogus_option=1)
    with pytest.raises(ValueError, match="Unknown index backend 'nope'"):
        ProcessSampler("nope", N, D)
    sampler = build_sampler("hnsw", N, D, process=True, num_threads=1)
    pid = sampler.pid
    assert pid in _children_pids()
    # a rebuild that fails in the child (rows of the wrong shape) is raised in the trainer
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((N, D + 1), dtype=np.float32))
    assert sampler.start_rebuild(NpyRowSource(bad), 0)
    with pytest.raises(RuntimeError, match=r"rebuild.*failed.*shape \(num_classes, dim\)"):
        sampler.wait_rebuild(120)
    with pytest.raises(RuntimeError, match="no index yet"):
        sampler.query(np.zeros((2, D), np.float32), 3)
    # the child keeps serving after an error
    sampler.rebuild(clustered_rows(N, D, seed=4))
    assert sampler.query(np.ones((2, D), np.float32), 3).shape == (2, 3)
    sampler.close()
    assert not sampler.alive and pid not in _children_pids() and not psutil.pid_exists(pid)
    sampler.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sampler.start_rebuild(clustered_rows(N, D, seed=4))


def test_random_stays_in_process_and_rows_none_needs_a_source():
    s = build_sampler("random", N, D, process=True, threads=1)
    assert not isinstance(s, ProcessSampler)
    assert ParamRowSource.from_dict(ParamRowSource(["tcp://127.0.0.1:1"], "t").to_dict()) \
        .addresses == ["tcp://127.0.0.1:1"]


def test_index_process_exits_when_the_trainer_dies():
    code = textwrap.dedent("""
        import sys, time
        from hfsoftmax.samplers import build_sampler
        s = build_sampler("hnsw", 100, 8, process=True, num_threads=1)
        print(s.pid, flush=True)
        time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                               cwd=ROOT, text=True)
    try:
        child = psutil.Process(int(trainer.stdout.readline()))
        assert child.is_running() and child.ppid() == trainer.pid
        trainer.kill()  # no atexit, no finalizer: the child must notice by itself
        trainer.wait(30)
        gone, alive = psutil.wait_procs([child], timeout=60)  # a hang guard
        assert child in gone and not alive
    finally:
        if trainer.poll() is None:
            trainer.kill()
