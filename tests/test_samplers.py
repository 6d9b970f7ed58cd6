"""Selection rule, registry, metrics and telemetry of hfsoftmax.samplers (exact + random)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfsoftmax.samplers import (build_sampler, list_samplers, recall_of_true_topk,
                                register_sampler, select_classes)
from hfsoftmax.samplers.registry import _lazy
from hfsoftmax.samplers.selection import (own_slots, random_topup, sample_log_weights,
                                          topup_log_weights)

torch.set_num_threads(1)


def naive_selection_prefix(labels, neighbours, need):
    """Reference: sorted unique labels, then rank-interleaved de-duplicated neighbours."""
    uniq = sorted(set(labels.tolist()))
    near = []
    seen = set(uniq)
    for r in range(neighbours.shape[1]):
        for b in range(neighbours.shape[0]):
            c = int(neighbours[b, r])
            if c >= 0 and c not in seen and len(near) < need:
                seen.add(c)
                near.append(c)
    return uniq, near


@st.composite
def selection_cases(draw):
    n = draw(st.integers(1, 3000))
    b = draw(st.integers(1, 40))
    labels = np.array(draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b)))
    n_uniq = len(set(labels.tolist()))
    s = draw(st.integers(n_uniq, n + 5))
    k = draw(st.integers(1, 8))
    nb = np.array(draw(st.lists(st.integers(-1, n - 1), min_size=b * k, max_size=b * k)))
    seed = draw(st.integers(0, 2**31))
    share = draw(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0]))
    return n, labels, s, nb.reshape(b, k), seed, share


@settings(max_examples=200, deadline=None)
@given(selection_cases())
def test_selection_invariants(case):
    n, labels, s, neighbours, seed, share = case
    ids, remapped, n_near = select_classes(labels, neighbours, s, n, np.random.default_rng(seed),
                                           random_share=share)
    assert ids.dtype == np.int64 and remapped.dtype == np.int64
    assert len(ids) == min(s, n)
    assert len(np.unique(ids)) == len(ids)              # unique
    assert ids.min() >= 0 and ids.max() < n             # in range
    np.testing.assert_array_equal(ids[remapped], labels)  # labels remapped correctly
    if s >= n:
        np.testing.assert_array_equal(ids, np.arange(n))
        np.testing.assert_array_equal(remapped, labels)
        return
    free = s - len(set(labels.tolist()))
    # random_share reserves round(share * free) of the non-label slots for random classes
    uniq, near = naive_selection_prefix(labels, neighbours, free - int(round(share * free)))
    # labels first, then the neighbours in rank order, then the random top-up
    np.testing.assert_array_equal(ids[:len(uniq)], uniq)
    assert n_near == len(near)
    np.testing.assert_array_equal(ids[len(uniq):len(uniq) + len(near)], near)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200_000), st.integers(0, 2000), st.integers(0, 2**31))
def test_random_topup_distinct_and_excluding(n, count, seed):
    rng = np.random.default_rng(seed)
    exclude = np.unique(rng.integers(0, n, min(n, 50)))
    count = min(count, n - exclude.size)
    out = random_topup(rng, n, exclude, count)
    assert out.size == count and np.unique(out).size == count
    assert not np.isin(out, exclude).any()
    assert (out >= 0).all() and (out < n).all()


def test_random_topup_is_uniform():
    # every class of 200 (minus 20 excluded) drawn about equally often over many draws
    rng = np.random.default_rng(0)
    exclude = np.arange(20)
    counts = np.zeros(200)
    for _ in range(2000):
        counts[random_topup(rng, 200, exclude, 30)] += 1
    assert counts[:20].sum() == 0
    expected = 2000 * 30 / 180
    assert np.abs(counts[20:] - expected).max() < 0.25 * expected


def test_random_topup_sparse_path_large_n():
    rng = np.random.default_rng(0)
    out = random_topup(rng, 10_000_000, np.array([5, 7]), 1000)
    assert out.size == 1000 and np.unique(out).size == 1000 and not np.isin(out, [5, 7]).any()


def test_random_topup_too_many_raises():
    with pytest.raises(ValueError, match="cannot draw 5 random classes"):
        random_topup(np.random.default_rng(0), 10, np.arange(7), 5)


# ---------------------------------------------------------------------- registry
def test_registry_lists_and_rejects():
    assert set(list_samplers()) >= {"annoy", "hnsw", "faiss", "exact", "device", "random"}
    with pytest.raises(ValueError, match="Unknown sampler 'nope'.*annoy, device, exact, "
                                         "faiss, hnsw, random"):
        build_sampler("nope", 10, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("exact", lambda *a, **k: None)


def test_missing_optional_backend_says_what_to_install():
    factory = _lazy(".exact", "ExactSampler", "hfsoftmax_no_such_package", "no-such-package")
    with pytest.raises(ImportError, match="pip install no-such-package"):
        factory(10, 4)


def test_import_is_lazy():
    import subprocess
    import sys
    code = ("import sys, hfsoftmax.samplers as s; s.build_sampler('random', 10, 4); "
            "print([m for m in ('annoy', 'hnswlib', 'faiss') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("bad", [dict(metric="l2"), dict(interval=0), dict(mips="x")])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        build_sampler("exact", 10, 4, **bad)


# ---------------------------------------------------------------------- sampler.select
def make_exact(n=500, d=16, metric="ip", seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, d)).astype(np.float32)
    s = build_sampler("exact", n, d, metric=metric, seed=seed, chunk_rows=97)
    s.rebuild(rows)
    return s, rows


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_exact_query_matches_naive(metric):
    s, rows = make_exact(metric=metric)
    x = np.random.default_rng(1).standard_normal((12, 16)).astype(np.float32)
    if metric == "cosine":
        logits = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ \
            (rows / np.linalg.norm(rows, axis=1, keepdims=True)).T
    else:
        logits = x @ rows.T
    np.testing.assert_array_equal(s.query(x, 7), np.argsort(-logits, axis=1)[:, :7])


def test_select_uses_nearest_classes_then_random():
    s, rows = make_exact()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 3, 10, 11, 12, 13, 14, 15])
    ids, remapped = s.select(x, y, 60)
    assert ids.dtype == torch.long and remapped.dtype == torch.long and ids.shape == (60,)
    assert torch.equal(ids[remapped], y)
    assert ids[:7].tolist() == [3, 10, 11, 12, 13, 14, 15]
    # the neighbour block equals the rule applied to the exact neighbours
    nb = s.query(x, int(np.ceil(53 / 8 * 1.25)) + 1)
    _, near = naive_selection_prefix(y.numpy(), nb, 53)
    assert ids[7:7 + len(near)].tolist() == near and len(near) == s.last_num_neighbours > 0


def test_random_share_keeps_half_the_free_slots_for_random_classes():
    """random_share=0.5: the nearest classes fill half the non-label slots (the same ones, in
    the same order, as the paper's rule would pick first), random classes the other half."""
    plain, rows = make_exact()
    mixed = build_sampler("exact", plain.num_classes, 16, seed=0, random_share=0.5)
    mixed.rebuild(rows)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 3, 10, 11, 12, 13, 14, 15])
    ids_p, _ = plain.select(x, y, 60)
    ids_m, remapped = mixed.select(x, y, 60)
    assert torch.equal(ids_m[remapped], y) and len(set(ids_m.tolist())) == 60
    free = 60 - 7
    assert mixed.last_num_neighbours == free - round(0.5 * free) == 27
    assert ids_m[:7 + 27].tolist() == ids_p[:7 + 27].tolist()
    # the rest are random: not simply the next nearest classes
    assert set(ids_m[34:].tolist()) != set(ids_p[34:].tolist())
    only_random = build_sampler("exact", plain.num_classes, 16, random_share=1.0)
    only_random.rebuild(rows)
    only_random.select(x, y, 60)
    assert only_random.last_num_neighbours == 0
    for bad in (-0.1, 1.5, float("nan"), True, "half"):
        with pytest.raises(ValueError, match="random_share must be a number in"):
            build_sampler("exact", 100, 16, random_share=bad)


def test_log_weights_make_the_sampled_normaliser_unbiased():
    """log_weights=True (the log-Q correction): 0 for the labels and neighbours, log(#other
    classes / #random) for the random top-up; over many draws each sample's corrected
    normaliser averages to the full softmax's, which the uncorrected one falls well short of."""
    _, rows = make_exact()
    s = build_sampler("exact", 500, 16, seed=0, random_share=0.5)
    s.rebuild(rows)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 3, 10, 11, 12, 13, 14, 15])
    logits = 0.25 * (x.numpy() @ rows.T)                    # (8, 500), std ~1
    full = np.exp(logits).sum(1)
    fixed = 7 + 27                                          # labels + neighbours (see above)
    want = np.log((500 - fixed) / (60 - fixed))
    corrected, plain, seen = np.zeros(8), np.zeros(8), np.zeros(500)
    draws = 1500
    for _ in range(draws):
        ids, remapped, off = s.select(x, y, 60, log_weights=True)
        ids, off = ids.numpy(), off.numpy()
        assert off.dtype == np.float32 and torch.equal(torch.from_numpy(ids)[remapped], y)
        assert (off[:fixed] == 0).all() and np.allclose(off[fixed:], want)
        z = logits[:, ids]
        corrected += np.exp(z + off).sum(1) / draws
        plain += np.exp(z).sum(1) / draws
        seen[ids] += 1
    assert (seen > 0).sum() == 500                          # every class was drawn at times
    np.testing.assert_allclose(corrected, full, rtol=0.03)
    assert (plain < 0.5 * full).all()
    # every class selected: nothing to correct; numpy in, numpy out
    ids, _, off = s.select(x.numpy(), y.numpy(), 500, log_weights=True)
    assert isinstance(off, np.ndarray) and off.shape == (500,) and not off.any()
    assert not topup_log_weights(60, 500, 60).any()
    with pytest.raises(ValueError, match="num_fixed=61 must be in"):
        topup_log_weights(60, 500, 61)


def test_own_slots_and_per_sample_log_weights():
    """own_slots: each sample's label slot, then the slots of its own neighbours that the
    selection holds (-1 for one left out, padding or the label itself); sample_log_weights:
    0 there, log((N - a_i) / (S - a_i)) on every other slot, a_i = the distinct own slots."""
    ids = np.array([7, 3, 9, 40, 41, 42, 50, 51])            # labels 7, 3, 9 first
    remapped = np.array([0, 1, 2, 0])                        # the 4th sample is class 7 too
    nb = np.array([[40, 99, -1],                             # 99 not selected, -1 padding
                   [3, 41, 42],                              # 3: its own label
                   [51, 40, 7],                              # 7: another sample's label
                   [40, 41, 40]])                            # a repeat counts once
    own = own_slots(ids, remapped, nb)
    np.testing.assert_array_equal(own, [[0, 3, -1, -1], [1, -1, 4, 5], [2, 7, 3, 0],
                                        [0, 3, 4, 3]])
    np.testing.assert_array_equal(own_slots(ids, remapped, None), remapped[:, None])
    off = sample_log_weights(own, 8, 1000)
    assert off.dtype == np.float32 and off.shape == (4, 8)
    for i, a in enumerate([2, 3, 4, 3]):
        mine = np.zeros(8, bool)
        mine[own[i][own[i] >= 0]] = True
        assert mine.sum() == a and not off[i, mine].any()
        np.testing.assert_allclose(off[i, ~mine], np.log((1000 - a) / (8 - a)), rtol=1e-6)
    # a tensor in: a tensor back on its device, the same values (what the head passes)
    t = sample_log_weights(torch.from_numpy(own), 8, 1000)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), off)
    # every class selected (or every slot a sample's own): nothing to stand for
    assert not sample_log_weights(own, 8, 8).any()
    assert not sample_log_weights(np.array([[0, 1, 2]]), 3, 100).any()
    with pytest.raises(ValueError, match="neighbours must have shape"):
        own_slots(ids, remapped, nb[:3])
    for bad in (np.array([[8]]), np.array([[-1, 2]]), np.array([0, 1])):
        with pytest.raises(ValueError, match="own must be"):
            sample_log_weights(bad, 8, 1000)


def test_select_gives_own_slots_for_the_per_sample_correction():
    """log_weights="sample": the third value is own_slots of the selection and of the
    neighbours the index returned; anything but False / True / "sample" is refused."""
    _, rows = make_exact()
    s = build_sampler("exact", 500, 16, seed=0)
    s.rebuild(rows)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 3, 10, 11, 12, 13, 14, 15])
    state = s.rng.bit_generator.state
    ids, remapped, own = s.select(x, y, 60, log_weights="sample")
    s.rng.bit_generator.state = state
    ids2, _ = s.select(x, y, 60)
    assert torch.equal(ids, ids2) and own.dtype == torch.int64
    assert torch.equal(own[:, 0], remapped) and own.shape[1] > 1
    near = s.query(x, own.shape[1] - 1)
    sel = ids.numpy()
    for i in range(8):
        want = {int(c) for c in near[i] if c in sel and c != int(y[i])}
        got = {int(sel[j]) for j in own[i, 1:].tolist() if j >= 0}
        assert got == want
    for bad in ("random", 1, None):
        with pytest.raises(ValueError, match="log_weights must be False, True or 'sample'"):
            s.select(x, y, 60, log_weights=bad)


def test_select_full_when_sample_num_covers_all_classes():
    s, _ = make_exact(n=50)
    x, y = torch.randn(6, 16), torch.tensor([4, 1, 4, 49, 0, 7])
    for sample_num in (50, 80):
        ids, remapped = s.select(x, y, sample_num)
        assert torch.equal(ids, torch.arange(50)) and torch.equal(remapped, y)


def test_select_errors_name_the_problem():
    s, _ = make_exact(n=100)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="sample_num=2 is smaller than the 4 distinct labels"):
        s.select(x, torch.tensor([1, 2, 3, 4]), 2)
    with pytest.raises(ValueError, match=r"label 100 is outside \[0, num_classes=100\)"):
        s.select(x, torch.tensor([1, 2, 3, 100]), 20)
    with pytest.raises(ValueError, match=r"label -1 is outside"):
        s.select(x, torch.tensor([1, 2, 3, -1]), 20)
    with pytest.raises(ValueError, match="dim=16"):
        s.select(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]), 20)
    with pytest.raises(ValueError, match=r"labels must have shape \(batch_size,\) = \(4,\)"):
        s.select(x, torch.tensor([1, 2, 3]), 20)
    with pytest.raises(ValueError, match="sample_num must be a positive integer"):
        s.select(x, torch.tensor([1, 2, 3, 4]), 0)
    with pytest.raises(ValueError, match="rows must have shape"):
        s.rebuild(np.zeros((99, 16), np.float32))
    with pytest.raises(FloatingPointError, match="NaN"):
        s.rebuild(np.full((100, 16), np.nan, np.float32))


def test_select_before_first_index_is_labels_plus_random(caplog):
    s = build_sampler("exact", 1000, 16, seed=3)
    y = torch.tensor([5, 6, 7, 5])
    with caplog.at_level(logging.INFO, logger="hfsoftmax.samplers.selector"):
        ids, remapped = s.select(torch.randn(4, 16), y, 40)
    assert "no index yet" in caplog.text
    assert ids[:3].tolist() == [5, 6, 7] and len(set(ids.tolist())) == 40
    assert torch.equal(ids[remapped], y) and s.last_num_neighbours == 0
    with pytest.raises(RuntimeError, match="no index yet"):
        s.query(np.zeros((1, 16), np.float32), 3)


def test_random_sampler_is_seeded_and_never_indexes():
    a = build_sampler("random", 10_000, 8, seed=5)
    b = build_sampler("random", 10_000, 8, seed=5)
    y = torch.tensor([1, 2, 3])
    ia, _ = a.select(torch.randn(3, 8), y, 100)
    ib, _ = b.select(torch.randn(3, 8), y, 100)
    assert torch.equal(ia, ib) and len(set(ia.tolist())) == 100
    assert a.maybe_rebuild(0, np.zeros((10_000, 8), np.float32)) is False
    assert a.index_age is None and not a.has_index


def test_numpy_in_numpy_out():
    s, _ = make_exact()
    ids, remapped = s.select(np.random.randn(3, 16).astype(np.float32), np.array([1, 2, 2]), 10)
    assert isinstance(ids, np.ndarray) and (ids[remapped] == [1, 2, 2]).all()


def test_mips_augmentation_preserves_inner_product_order():
    # the reduction used by mips="augment": exact on the augmented vectors == exact MIPS
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 12)).astype(np.float32) * rng.uniform(0.2, 3, (300, 1))
    s = build_sampler("exact", 300, 12, metric="ip")
    from hfsoftmax.samplers.index import Index
    aug = Index(300, 12, metric="ip", mips="augment")
    r, q = aug.prepare_rows(rows), aug.prepare_queries(rng.standard_normal((20, 12)).astype("f4"))
    assert r.shape == (300, 13) and np.allclose(np.linalg.norm(r, axis=1), 1, atol=1e-5)
    x = q[:, :12]
    np.testing.assert_array_equal(np.argsort(-(q @ r.T), 1)[:, :10],
                                  np.argsort(-(x @ rows.T), 1)[:, :10])
    assert s.index_dim == 12 and aug.index_dim == 13


# ---------------------------------------------------------------------- telemetry
def test_recall_of_true_topk_against_naive():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((400, 8)).astype(np.float32)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    top = np.argsort(-(x @ rows.T), axis=1)[:, :10]
    selected = np.unique(top[:, :5])  # the first half of everyone's top-10
    expect = np.isin(top, selected).mean()
    got = recall_of_true_topk(torch.from_numpy(x), rows, torch.from_numpy(selected), 10,
                              chunk_rows=64)
    assert got == pytest.approx(expect) and 0.5 <= got < 1.0
    assert recall_of_true_topk(x, rows, np.arange(400), 10) == 1.0
    # with labels, the own class is left out of each sample's top-k
    labels = top[:, 0]
    got = recall_of_true_topk(x, rows, np.unique(top[:, 1:6]), 5, labels=labels)
    assert got == 1.0
    s, _ = make_exact()
    assert s.recall_of_true_topk(np.zeros((2, 16), np.float32) + 1, np.eye(500, 16, dtype="f4"),
                                 np.arange(500), 3) == 1.0
