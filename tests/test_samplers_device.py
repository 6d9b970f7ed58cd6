"""The ``device`` sampler: exact selection over a copy of the rows on the features' device.

Run here on the CPU (the same code as on a GPU, float32): it must select exactly what the
``exact`` sampler selects over the same rows and seed, keep its copy equal to the row store
through the head's notes and the interval refreshes, and give the same top-k however the
rows are chunked.
"""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from paramserver.optim import SGDConfig

from hfsoftmax.heads import SampledHead
from hfsoftmax.rowstore import LocalRowStore
from hfsoftmax.samplers import build_sampler, list_samplers
from hfsoftmax.samplers.device_rows import DeviceRows
from hfsoftmax.samplers.index import normalize
from hfsoftmax.samplers.synthetic import clustered_rows, queries_near

torch.set_num_threads(1)
N, D, B, S = 3000, 32, 64, 500


def prepared(rows, metric):
    return normalize(rows) if metric == "cosine" else rows


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("random_share", [0.0, 0.3])
def test_selects_exactly_what_the_exact_sampler_selects(metric, random_share):
    for seed in (0, 1, 2):
        rows = clustered_rows(N, D, unit=metric == "cosine", seed=seed)
        opts = dict(metric=metric, seed=seed, random_share=random_share, background=False)
        exact = build_sampler("exact", N, D, **opts)
        dev = build_sampler("device", N, D, chunk_rows=700, **opts)
        assert "device" in list_samplers() and dev.name == "device"
        exact.rebuild(rows)
        dev.rebuild(rows)
        for t, log_weights in enumerate((False, True, "sample")):
            x, y = queries_near(rows, B, seed=100 * seed + t)
            y[:8] = y[0]  # repeated labels: fewer unique labels than samples
            a = exact.select(torch.from_numpy(x), torch.from_numpy(y), S, log_weights)
            b = dev.select(torch.from_numpy(x), torch.from_numpy(y), S, log_weights)
            assert len(a) == len(b) == (2 if log_weights is False else 3)
            for u, v in zip(a, b):  # ids, remapped labels, log-Q offsets / own slots
                assert isinstance(v, torch.Tensor)
                np.testing.assert_array_equal(u.numpy(), v.numpy())
            assert dev.last_num_neighbours == exact.last_num_neighbours > 0
        # numpy in, numpy out; the same RNG stream afterwards
        x, y = queries_near(rows, B, seed=7)
        a, b = exact.select(x, y, S), dev.select(x, y, S)
        assert isinstance(b[0], np.ndarray)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(exact.query(x, 10), dev.query(x, 10))
        ia, sa = exact.query_scored(x, 10)
        ib, sb = dev.query_scored(x, 10)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-6)


def test_before_its_first_copy_it_selects_labels_and_random_classes_like_exact():
    rows = clustered_rows(N, D, seed=0)
    exact = build_sampler("exact", N, D, metric="cosine", seed=3)
    dev = build_sampler("device", N, D, metric="cosine", seed=3)
    x, y = queries_near(rows, B, seed=1)
    a, b = exact.select(x, y, S), dev.select(x, y, S)
    np.testing.assert_array_equal(a[0], b[0])
    assert dev.last_num_neighbours == 0 and not dev.has_index
    with pytest.raises(RuntimeError, match="no copy of the rows yet"):
        dev.query(x, 3)


def test_chunking_gives_the_one_block_result():
    rows = clustered_rows(N, D, unit=False, seed=4)
    x, _ = queries_near(rows, B, seed=5)
    out = []
    for chunk in (N, 1024, 97):
        r = DeviceRows(N, D, metric="ip", device="cpu", chunk_rows=chunk, load_rows=333)
        r.rebuild(rows, step=0)
        np.testing.assert_array_equal(r.values().numpy(), rows)  # loaded in 333-row pieces
        out.append(r.topk(torch.from_numpy(x), 40))
    for scores, ids in out[1:]:
        np.testing.assert_array_equal(ids.numpy(), out[0][1].numpy())
        np.testing.assert_allclose(scores.numpy(), out[0][0].numpy(), rtol=0, atol=1e-6)
    ref = np.argsort(-(x @ rows.T), axis=1, kind="stable")[:, :40]
    np.testing.assert_array_equal(out[0][1].numpy(), ref)


def test_half_precision_copy_finds_nearly_the_same_classes():
    # float16/bfloat16 is the copy's dtype on CUDA; the CPU runs the same code (slowly)
    rows = clustered_rows(N, D, seed=6)
    x, _ = queries_near(rows, B, seed=7)
    ref = np.argsort(-(x @ rows.T), axis=1, kind="stable")[:, :10]
    for dtype in ("float16", "bfloat16"):
        r = DeviceRows(N, D, metric="cosine", device="cpu", dtype=dtype)
        r.rebuild(rows, step=0)
        assert r.values().dtype == getattr(torch, dtype)
        scores, ids = r.topk(torch.from_numpy(x), 10)
        assert scores.dtype == torch.float32
        hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.numpy(), ref)])
        assert hits >= 0.95, (dtype, hits)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_copy_follows_the_store_through_notes_and_refreshes(momentum):
    torch.manual_seed(0)
    n, d = 2000, 16
    store = LocalRowStore(n, d, SGDConfig(lr=0.5, momentum=momentum), std=0.1, seed=0)
    sampler = build_sampler("device", n, d, metric="cosine", interval=4, background=False)
    head = SampledHead(store, sampler, sample_num=200, logit="cosface", s=30.0, m=0.2)
    head.set_lr(0.5)
    g = torch.Generator().manual_seed(1)
    estimated = 0
    for step in range(11):
        x = torch.randn(32, d, generator=g, requires_grad=True)
        y = torch.randint(0, n, (32,), generator=g)
        head(x, y).loss.backward()
        copy = sampler.rows.values().numpy()
        want = normalize(store.read_all())
        if momentum == 0.0:  # the noted values w - lr * g are the store's own update
            np.testing.assert_allclose(copy, want, rtol=0, atol=2e-6)
        else:  # rows not pushed since the last refresh are the store's, bit for bit
            since = sampler.rows.index_step
            assert since == 4 * (step // 4) or step < 4
            moved = np.abs(copy - want).max(axis=1) > 2e-6
            assert moved.sum() <= 200 * (step - since + 1)
            estimated += moved.sum()
    assert momentum == 0.0 or estimated > 0  # with momentum the notes are estimates
    assert sampler.rebuilds == 3 and sampler.last_num_neighbours > 0
    sampler.rebuild(store.reader())
    np.testing.assert_array_equal(sampler.rows.values().numpy(), normalize(store.read_all()))


def test_background_refresh_carries_rows_noted_while_it_read():
    rows = clustered_rows(N, D, unit=False, seed=8)
    sampler = build_sampler("device", N, D, metric="ip", interval=5)
    sampler.rebuild(rows)
    gate, reading = threading.Event(), threading.Event()
    snapshot = rows + 1.0  # what the store held when the refresh read it

    def slow_reader():
        reading.set()
        assert gate.wait(30)
        return snapshot

    assert sampler.start_rebuild(slow_reader, step=5) and reading.wait(30)
    ids = np.arange(0, N, 10)
    noted = np.full((ids.size, D), 7.0, np.float32)
    sampler.note_rows(ids, noted, step=6)  # lands in the old copy, marked
    x, _ = queries_near(rows, 4, seed=9)
    assert sampler.rebuilding and sampler.query(x, 1).shape == (4, 1)  # the old copy serves
    np.testing.assert_array_equal(sampler.rows.values().numpy()[ids], noted)
    gate.set()
    assert sampler.wait_rebuild(30)
    got = sampler.rows.values().numpy()
    want = snapshot.copy()
    want[ids] = noted
    np.testing.assert_array_equal(got, want)
    assert sampler.rows.index_step == 5 and sampler.rebuilds == 2


def test_rows_noted_before_the_first_copy_bring_the_next_refresh_forward():
    rows = clustered_rows(N, D, seed=10)
    sampler = build_sampler("device", N, D, metric="cosine", interval=100)
    gate = threading.Event()
    assert sampler.maybe_rebuild(0, lambda: (gate.wait(30), rows)[1])  # first, background
    sampler.note_rows(np.array([1, 2]), np.ones((2, D), np.float32), step=0)  # no copy yet
    gate.set()
    assert sampler.wait_rebuild(30) and sampler.has_index and sampler.fresh.full
    assert sampler.maybe_rebuild(1, rows)  # early: interval 100 has not passed
    assert sampler.wait_rebuild(30) and not sampler.fresh.full
    assert not sampler.maybe_rebuild(2, rows)


def test_options_and_errors_name_the_bad_value(caplog):
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        build_sampler("device", N, D, dtype="float8", device="cpu")
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer, got 0"):
        build_sampler("device", N, D, chunk_rows=0)
    with pytest.raises(ValueError, match="interval must be a positive"):
        build_sampler("device", N, D, interval=0)
    with caplog.at_level(logging.INFO, logger="hfsoftmax.samplers"):
        s = build_sampler("device", N, D, metric="cosine", fresh_rows=4096, process=True,
                          threads=2, timeout_s=5)
    assert "fresh_rows=4096 ignored" in caplog.text and "process=True has no effect" in caplog.text
    assert type(s).__name__ == "DeviceSampler" and s.stats()["fresh_rows"] is None
    with pytest.raises(ValueError, match=r"features must have shape \(batch_size, dim=32\)"):
        s.select(torch.zeros(4, 31), torch.zeros(4, dtype=torch.long), S)
    with pytest.raises(ValueError, match=r"rows must have shape .*\(3000, 32\)"):
        s.rebuild(np.zeros((10, D), np.float32))
    bad = np.zeros((N, D), np.float32)
    bad[3, 0] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        s.rebuild(bad)
    s.rebuild(clustered_rows(N, D, seed=0))
    with pytest.raises(ValueError, match="label 3000 is outside"):
        s.select(torch.zeros(2, D), torch.tensor([0, 3000]), S)
    with pytest.raises(ValueError, match=r"noted rows must have shape \(2, 32\)"):
        s.note_rows(np.array([0, 1]), np.zeros((2, 5), np.float32))
    huge = DeviceRows(2**40, 64, device="cpu")
    with pytest.raises(MemoryError, match=r"needs .* GB.*ANN sampler.*sharding"):
        huge._alloc()


@pytest.mark.gpu
def test_on_a_gpu_the_search_and_notes_never_sync_and_select_like_exact():
    rows = clustered_rows(N, D, seed=11)
    exact = build_sampler("exact", N, D, metric="cosine", seed=0, background=False)
    dev = build_sampler("device", N, D, metric="cosine", seed=0, background=False)
    exact.rebuild(rows)
    dev.rebuild(rows)
    assert dev.rows.device.type == "cuda" and dev.rows.values().dtype == torch.float16
    x, y = queries_near(rows, B, seed=12)
    xd, yd = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    a = exact.select(xd, yd, S)
    b = dev.select(xd, yd, S)
    assert b[0].device.type == "cuda"
    np.testing.assert_array_equal(a[1].cpu().numpy(), b[1].cpu().numpy())  # labels first
    labels = np.unique(y).size
    np.testing.assert_array_equal(a[0][:labels].cpu().numpy(), b[0][:labels].cpu().numpy())
    n_near = exact.last_num_neighbours
    assert dev.last_num_neighbours == n_near > 0
    near_a = set(a[0][labels:labels + n_near].tolist())
    near_b = set(b[0][labels:labels + n_near].tolist())
    assert len(near_a & near_b) >= 0.97 * n_near  # a float16 copy: near-ties may flip
    ids = torch.arange(0, N, 7, device="cuda")
    vals = torch.randn(ids.numel(), D, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dev.rows.topk(xd, 40)
        dev.note_rows(ids, vals)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = dev.rows.values()[ids].float()
    want = torch.nn.functional.normalize(vals, dim=1)
    assert torch.allclose(got, want, atol=2e-3)
