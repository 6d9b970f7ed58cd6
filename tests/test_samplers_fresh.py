"""Fresh rows: rows changed since the index snapshot, searched exactly beside the index.

Real indexes (exact, annoy, hnswlib, faiss; in the trainer and in an index process): after
rows move, the merged neighbours are the true top-k over the *current* rows, where the
stale index alone misses most of them.
"""
import numpy as np
import pytest
import torch

from paramserver.optim import SGDConfig

from hfsoftmax.heads import SampledHead
from hfsoftmax.rowstore import LocalRowStore
from hfsoftmax.samplers import build_sampler
from hfsoftmax.samplers.fresh import FreshRows, merge_topk

N, D = 3000, 32


def true_topk(x, rows, k, metric):
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return np.argsort(-(x @ rows.T), axis=1, kind="stable")[:, :k]


def recall(true, got):
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(true, got)]))


def test_fresh_rows_topk_drop_and_merge_match_brute_force():
    rng = np.random.default_rng(0)
    fr = FreshRows(100, 8, capacity=30, normalize=False)
    ids = rng.choice(100, 20, replace=False)
    vals = rng.standard_normal((20, 8)).astype(np.float32)
    assert fr.note(ids, vals, step=3) == 0 and fr.size == 20
    # overwrite 5 of them at a later step, add 15 new: only 10 slots are left
    more = np.concatenate([ids[:5], np.setdiff1d(np.arange(100), ids)[:15]])
    vals2 = rng.standard_normal((20, 8)).astype(np.float32)
    assert fr.note(more, vals2, step=7) == 5 and fr.full
    x = rng.standard_normal((4, 8)).astype(np.float32)
    kept = dict(zip(ids.tolist(), vals))
    kept.update(zip(more[:15].tolist(), vals2[:15]))
    kid = np.array(sorted(kept))
    ref = kid[np.argsort(-(x @ np.stack([kept[i] for i in kid]).T), axis=1)[:, :6]]
    got, scores = fr.topk(x, 6)
    np.testing.assert_array_equal(got, ref)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert fr.contains(np.array([ids[0], -1, 99 if 99 not in kept else 0])).tolist()[:2] == \
        [True, False]
    np.testing.assert_array_equal(fr.values(more[:3]), vals2[:3])  # overwritten values
    with pytest.raises(KeyError, match="not kept"):
        fr.values(more[15:])
    # rows kept before step 7 go (the index of step 7 holds them); the 15 of step 7 stay
    assert fr.drop_before(7) == 15 and fr.size == 15
    assert set(fr.ids().tolist()) == set(more[:15].tolist())
    np.testing.assert_array_equal(fr.contains(ids[5:]), np.zeros(15, bool))
    got, _ = fr.topk(x, 20)  # fewer kept than k: -1 pads
    assert (got[:, 15:] == -1).all() and set(got[0, :15].tolist()) == set(more[:15].tolist())
    # merge: best scores of both lists, padding never chosen over a real id
    a_ids, a_sc = np.array([[1, 2, -1]]), np.array([[0.9, 0.1, 5.0]], np.float32)
    b_ids, b_sc = np.array([[3, -1]]), np.array([[0.5, 9.0]], np.float32)
    assert merge_topk(a_ids, a_sc, b_ids, b_sc, 4).tolist() == [[1, 3, 2, -1]]
    with pytest.raises(ValueError, match=r"fresh rows must have shape \(2, 8\)"):
        fr.note(np.array([1, 2]), np.zeros((2, 7), np.float32), 9)
    with pytest.raises(ValueError, match=r"fresh row ids must lie in \[0, 100\)"):
        fr.note(np.array([100]), np.zeros((1, 8), np.float32), 9)


@pytest.mark.parametrize("process", [False, True])
@pytest.mark.parametrize("backend,opts", [("exact", {}), ("annoy", {}), ("hnsw", {}),
                                          ("faiss", {"nprobe": 64})])
@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_moved_rows_are_found_through_fresh_rows(backend, opts, metric, process):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((N, D)).astype(np.float32)
    fresh = build_sampler(backend, N, D, metric=metric, fresh_rows=500, process=process,
                          **opts)
    stale = build_sampler(backend, N, D, metric=metric, process=process, **opts)
    try:
        for s in (fresh, stale):
            s.rebuild(rows, step=0)
        cur = rows.copy()
        moved = rng.choice(N, 400, replace=False)
        cur[moved] = 3 * rng.standard_normal((400, D)).astype(np.float32)
        fresh.note_rows(moved, cur[moved], step=1)
        x = rng.standard_normal((16, D)).astype(np.float32)
        true = true_topk(x, cur, 10, metric)
        got = fresh.neighbours(x, 10)
        r_fresh, r_stale = recall(true, got), recall(true, stale.query(x, 10))
        assert r_fresh >= 0.97, (r_fresh, r_stale)
        assert r_stale < 0.9  # measured 0.0-0.02 (ip), 0.79-0.85 (cosine)
        if backend == "exact":
            np.testing.assert_array_equal(got, true)
        # and the selection uses them: labels, then the merged neighbours in rank order
        y = torch.arange(16)
        ids, _ = fresh.select(torch.from_numpy(x), y, 16 + 20)
        n_near = fresh.last_num_neighbours
        assert n_near > 10
        near = set(ids[16:16 + n_near].tolist())
        k = fresh.neighbour_oversample * 20 / 16
        assert near <= set(fresh.neighbours(x, int(np.ceil(k)) + 1)
                           .reshape(-1).tolist())
    finally:
        fresh.close()
        stale.close()


def test_a_full_fresh_store_triggers_an_early_rebuild_and_a_rebuild_empties_it():
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((200, 8)).astype(np.float32)
    s = build_sampler("exact", 200, 8, fresh_rows=30, interval=1000, background=False)
    assert s.maybe_rebuild(0, rows) and s.rebuilds == 1
    s.note_rows(np.arange(20), rows[:20], step=1)
    assert not s.maybe_rebuild(2, rows)          # 20 of 30 kept: not due
    s.note_rows(np.arange(20, 40), rows[20:40], step=2)
    assert s.fresh.full
    assert s.maybe_rebuild(3, rows) and s.rebuilds == 2   # full: rebuilt long before 1000
    # the rows kept before step 3 are in the new index: dropped (lazily, on the training
    # thread) at the next call, which is then not due again
    assert not s.maybe_rebuild(4, rows) and s.rebuilds == 2
    assert s.fresh.size == 0 and s.stats()["fresh_rows"] == 0
    with pytest.raises(ValueError, match="fresh_rows must be a non-negative integer"):
        build_sampler("exact", 200, 8, fresh_rows=-1)
    with pytest.raises(ValueError, match="mips='augment'"):
        build_sampler("faiss", 200, 8, fresh_rows=10, mips="augment")


def test_sampled_head_keeps_its_selection_fresh_between_rebuilds():
    """Training with an index never rebuilt after step 0: with fresh rows the selection
    holds the true top-10 of the current rows (one step lag aside), without it it does not."""
    torch.manual_seed(0)
    n, d, b = 400, 16, 4  # 60 slots hold every sample's top-10: recall can reach 1
    feats = torch.randn(n, d)
    out = {}
    for fresh_rows in (0, n):
        store = LocalRowStore(n, d, SGDConfig(lr=2.0), seed=3)
        sampler = build_sampler("exact", n, d, metric="cosine", fresh_rows=fresh_rows,
                                interval=10_000, background=False, seed=0)
        head = SampledHead(store, sampler, sample_num=60, logit="cosface", s=30.0, m=0.2,
                           recall_every=1)
        head.set_lr(2.0)  # as the trainer does: the head estimates the rows' new values
        head.train()
        gen = torch.Generator().manual_seed(1)
        recalls = []
        for _ in range(60):
            y = torch.randint(0, n, (b,), generator=gen)
            x = feats[y] + 0.1 * torch.randn(b, d, generator=gen)
            head(x, y).loss.backward()
            recalls.append(head.telemetry["recall"])
        out[fresh_rows] = float(np.mean(recalls[20:]))
        # without fresh rows: the step-0 index only; with: rebuilt early when all 400 rows
        # are kept, which is rare
        assert sampler.rebuilds == 1 if not fresh_rows else sampler.rebuilds <= 3
    # measured: {0: 0.15, 400: 1.0}
    assert out[n] > out[0] + 0.2, out
    assert out[n] > 0.8, out


def test_fresh_rows_benchmark_compares_the_same_search():
    """benchmarks/fresh_rows.py times FreshRows.topk against the numpy form it replaced; both
    must return the same ids for the timing to compare like with like."""
    from tests.bench_utils import import_benchmark

    bench = import_benchmark("fresh_rows")
    out = bench.bench(16, 24, 500, 7, repeats=1, seed=3)
    assert out["same_ids"] is True and out["torch_ms"] > 0 and out["numpy_ms"] > 0


@pytest.mark.parametrize("normalize", [False, True])
def test_fresh_rows_device_copy_stays_in_step_with_the_host_rows(normalize):
    """On an accelerator the rows are mirrored on the device and only the noted rows travel
    each step; the mirror (here attached on the CPU, the code path a GPU takes) must give the
    same search as the host rows through overwrites, a full store and drops."""
    rng = np.random.default_rng(5)
    host = FreshRows(500, 16, capacity=120, normalize=normalize)
    dev = FreshRows(500, 16, capacity=120, normalize=normalize)
    dev._attach(torch.device("cpu"))
    assert FreshRows(10, 2, 4, False).to("cpu")._dev is None  # the CPU searches the host rows
    x = rng.standard_normal((9, 16)).astype(np.float32)
    for step in range(12):
        ids = rng.choice(500, 40, replace=False)
        vals = rng.standard_normal((40, 16)).astype(np.float32)
        assert host.note(ids, vals, step) == dev.note(ids, vals, step)
        if step % 4 == 3:
            assert host.drop_before(step - 1) == dev.drop_before(step - 1)
        np.testing.assert_array_equal(dev._dev[:dev.size].numpy(), host._rows[:host.size])
        for a, b in zip(host.topk(x, 7), dev.topk(x, 7)):
            np.testing.assert_array_equal(a, b)
