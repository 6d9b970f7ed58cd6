"""Background rebuild (issue 3, must-show 5): a step never waits for a rebuild.

The slow build is made deterministic with Events (no timing thresholds): the build blocks
until the test releases it, and the test proves a select() issued meanwhile returned.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hfsoftmax.samplers import ClassSampler, build_sampler
from hfsoftmax.samplers.exact import ExactIndex

torch.set_num_threads(1)
N, D = 2000, 16


class GatedExactIndex(ExactIndex):
    """An exact index whose build blocks until ``release`` is set."""

    name = "gated-exact"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.build_started = threading.Event()
        self.release = threading.Event()
        self.build_finished = threading.Event()

    def build(self, rows):
        self.build_started.set()
        if not self.release.wait(timeout=60):
            raise TimeoutError("test never released the build")
        index = super().build(rows)
        self.build_finished.set()
        return index


class GatedExact(ClassSampler):
    """An exact sampler whose build blocks until ``release`` is set."""

    def __init__(self, num_classes, dim, metric="ip", **policy):
        gate = GatedExactIndex(num_classes, dim, metric=metric)
        super().__init__(num_classes, dim, metric=metric, index=gate, **policy)
        self.build_started, self.release = gate.build_started, gate.release
        self.build_finished = gate.build_finished


def rows_of(seed):
    return np.random.default_rng(seed).standard_normal((N, D)).astype(np.float32)


def test_step_during_rebuild_returns_before_the_rebuild_finishes():
    s = GatedExact(N, D, metric="cosine", interval=10)
    old, new = rows_of(0), rows_of(1)
    s.release.set()
    assert s.maybe_rebuild(0, old) and s.wait_rebuild(30) and s.index_age == 0
    s.release.clear()
    s.build_started.clear()
    s.build_finished.clear()
    x = torch.from_numpy(new[:8] * 3)  # features that point at the new rows
    assert not s.maybe_rebuild(9, lambda: new)   # not due yet
    assert s.maybe_rebuild(10, lambda: new)      # due: starts in the background
    assert s.build_started.wait(30) and s.rebuilding
    # a training step while the build is blocked: it returns, using the old index
    ids, remapped = s.select(x, torch.arange(8), 100)
    assert not s.build_finished.is_set() and s.rebuilding
    assert torch.equal(ids[remapped], torch.arange(8))
    xn = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    on = old / np.linalg.norm(old, axis=1, keepdims=True)
    assert np.array_equal(s.query(x, 1)[:, 0], np.argmax(xn @ on.T, axis=1))
    assert s.index_age == 10  # still the rows of step 0
    assert not s.maybe_rebuild(25, lambda: new)  # due again, but one is running: no double
    s.release.set()
    assert s.wait_rebuild(30) and s.build_finished.is_set()
    # swapped: the new index answers, its rows are from step 10
    assert np.array_equal(s.query(x, 1)[:, 0], np.arange(8))
    assert s.index_age == 15 and s.rebuilds == 2 and s.last_rebuild_s is not None


def test_first_build_in_background_selects_labels_plus_random_meanwhile():
    s = GatedExact(N, D, interval=5)
    reading = threading.Event()

    def read_rows():  # the row store read also runs on the rebuild thread
        reading.set()
        return rows_of(2)

    assert s.maybe_rebuild(0, read_rows)
    assert s.build_started.wait(30) and reading.is_set()
    ids, _ = s.select(torch.randn(4, D), torch.tensor([1, 2, 3, 4]), 50)
    assert s.last_num_neighbours == 0 and len(set(ids.tolist())) == 50
    assert not s.has_index and s.index_age is None
    s.release.set()
    assert s.wait_rebuild(30) and s.has_index
    s.select(torch.randn(4, D), torch.tensor([1, 2, 3, 4]), 50)
    assert s.last_num_neighbours == 46


def test_failed_background_rebuild_surfaces_on_the_training_thread():
    s = build_sampler("exact", N, D)

    def broken():
        raise OSError("row store unreachable")

    assert s.maybe_rebuild(0, broken)
    s.index.join(30)
    with pytest.raises(RuntimeError, match="background index rebuild failed.*unreachable"):
        s.maybe_rebuild(1, broken)


def test_synchronous_mode_and_stats():
    s = build_sampler("exact", N, D, background=False, interval=3)
    assert s.maybe_rebuild(0, rows_of(0)) and s.has_index and not s.rebuilding
    assert not s.maybe_rebuild(2, rows_of(0))
    assert s.maybe_rebuild(3, rows_of(0))
    st = s.stats()
    assert st["index_age"] == 0 and st["rebuilds"] == 2 and st["rebuild_s"] >= 0


@pytest.mark.parametrize("backend", ["annoy", "hnsw", "faiss"])
def test_real_backends_rebuild_in_background_and_swap(backend):
    rows0, rows1 = rows_of(3), rows_of(4)
    s = build_sampler(backend, N, D, metric="cosine", interval=1)
    assert s.maybe_rebuild(0, rows0) and s.wait_rebuild(60)
    assert s.maybe_rebuild(1, lambda: rows1)
    s.select(torch.randn(8, D), torch.arange(8), 100)  # concurrent with the build: fine
    assert s.wait_rebuild(60) and s.rebuilds == 2
    assert (s.query(rows1[:20], 1)[:, 0] == np.arange(20)).mean() >= 0.9
