"""Heads: logits and margins against naive formulas; the sampled head against the full head."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfsoftmax.heads import FullHead, HeadOutput, LogitSpec, SampledHead, build_head
from hfsoftmax.rowstore import LocalRowStore, SGDConfig
from hfsoftmax.samplers import ClassSampler, Index, build_sampler

torch.set_num_threads(1)

N, D, B = 50, 16, 12
LOGITS = [("linear", {}), ("cosface", {"s": 30.0, "m": 0.35}),
          ("arcface", {"s": 64.0, "m": 0.5})]


class RecordingIndex(Index):
    """An index that keeps a copy of the rows of every build and answers no query."""

    name = "permuting"
    angular = False  # index the raw rows (metric "ip")

    def __init__(self, num_classes: int, dim: int, built_from: list):
        super().__init__(num_classes, dim)
        self.built_from = built_from

    def build(self, rows):
        self.built_from.append(rows.copy())
        return "index"


class PermutingSampler(ClassSampler):
    """Selects every class in a random order (so remapping is exercised) or, with
    ``sample_num < num_classes``, the batch labels plus random others. The samplers package
    is tested on its own; this keeps the head tests independent of any index backend while
    using the real rebuild policy of :class:`ClassSampler`."""

    name = "permuting"

    def __init__(self, num_classes: int, dim: int = D, seed: int = 0, **kw):
        kw.setdefault("background", False)
        self.built_from: list[np.ndarray] = []
        super().__init__(num_classes, dim, seed=seed,
                         index=RecordingIndex(num_classes, dim, self.built_from), **kw)

    def select(self, features, labels, sample_num):
        labels = labels.cpu().numpy()
        uniq = np.unique(labels)
        rest = np.setdiff1d(np.arange(self.num_classes), uniq)
        self.rng.shuffle(rest)
        ids = np.concatenate([uniq, rest[:sample_num - uniq.size]])
        perm = self.rng.permutation(sample_num)
        ids = ids[perm]
        pos = np.empty(sample_num, dtype=np.int64)
        pos[perm] = np.arange(sample_num)
        target = pos[np.searchsorted(uniq, labels)]
        return torch.from_numpy(ids), torch.from_numpy(target)


def sampler_for(name: str, num_classes: int, dim: int, metric: str):
    if name == "permuting":
        return PermutingSampler(num_classes)
    return build_sampler(name, num_classes, dim, metric=metric, seed=0, background=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------- logits
def test_registry_lists_valid_names():
    with pytest.raises(ValueError, match="full, sampled"):
        build_head("partial_fc", 10, 4)
    assert isinstance(build_head("full", 10, 4), FullHead)


@pytest.mark.parametrize("kwargs,match", [
    ({"logit": "sphereface"}, "valid: linear, cosface, arcface"),
    ({"logit": "arcface", "m": 2.0}, "arcface margin m"),
    ({"logit": "cosface", "s": 0.0}, "scale s"),
    ({"logit": "cosface", "s": float("nan")}, "finite"),
])
def test_logit_spec_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogitSpec(**kwargs)


def test_full_head_rejects_bias_on_margin_heads_and_bad_labels():
    with pytest.raises(ValueError, match="bias=True only for the linear head"):
        FullHead(10, 4, logit="cosface", bias=True)
    head = FullHead(10, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        head(torch.randn(3, 4), torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=r"\(batch_size, 4\)"):
        head(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="1D tensor"):
        head(torch.randn(3, 4), torch.tensor([[0, 1, 2]]))


def test_linear_logits_match_naive_with_bias():
    torch.manual_seed(0)
    head = FullHead(N, D, bias=True)
    with torch.no_grad():
        head.bias.normal_()
    x, y = torch.randn(B, D), torch.randint(0, N, (B,))
    out = head(x, y)
    assert isinstance(out, HeadOutput)
    ref = x @ head.weight.T + head.bias
    torch.testing.assert_close(out.logits, ref)
    torch.testing.assert_close(out.loss, F.cross_entropy(ref, y))
    assert torch.equal(out.target, y)


@pytest.mark.parametrize("logit,s,m", [("cosface", 30.0, 0.35), ("arcface", 64.0, 0.5),
                                       ("arcface", 16.0, 0.3)])
def test_margin_logits_match_naive_formula(logit, s, m):
    torch.manual_seed(1)
    x = torch.randn(B, D, dtype=torch.float64)
    w = torch.randn(N, D, dtype=torch.float64)
    y = torch.randint(0, N, (B,))
    spec = LogitSpec(logit, s, m)
    got = spec(x, w, y)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    want = cos.clone()
    for i in range(B):
        c = cos[i, y[i]]
        if logit == "cosface":
            want[i, y[i]] = c - m
        else:
            theta = math.acos(float(c))
            # the margin only where theta + m < pi; beyond it the linear continuation
            want[i, y[i]] = math.cos(theta + m) if theta + m < math.pi else c - math.sin(m) * m
    torch.testing.assert_close(got, s * want, rtol=1e-9, atol=1e-9)


def test_arcface_beyond_threshold_and_easy_margin():
    m = 0.5
    cos_t = torch.tensor([0.99, 0.3, -0.2, -0.95, -0.999], dtype=torch.float64,
                         requires_grad=True)
    hard = LogitSpec("arcface", 1.0, m).target_logit(cos_t)
    easy = LogitSpec("arcface", 1.0, m, easy_margin=True).target_logit(cos_t)
    th = math.cos(math.pi - m)
    for c, h, e in zip(cos_t.tolist(), hard.tolist(), easy.tolist()):
        want_h = math.cos(math.acos(c) + m) if c > th else c - math.sin(m) * m
        want_e = math.cos(math.acos(c) + m) if c > 0 else c
        assert h == pytest.approx(want_h, abs=1e-12) and e == pytest.approx(want_e, abs=1e-12)
    # the target logit decreases monotonically in theta (increases with cos) everywhere
    grid = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    vals = LogitSpec("arcface", 1.0, m).target_logit(grid)
    assert bool((vals[1:] >= vals[:-1] - 1e-12).all())
    hard.sum().backward()
    assert torch.isfinite(cos_t.grad).all()
    # gradient stays finite at cos = +-1 exactly
    edge = torch.tensor([1.0, -1.0], requires_grad=True)
    LogitSpec("arcface", 64.0, m).target_logit(edge).sum().backward()
    assert torch.isfinite(edge.grad).all()


# ---------------------------------------------------------------- sampled == full
def _pair(logit: str, kw: dict, sampler_name: str, optim: SGDConfig | None = None,
          num_classes: int = N):
    store = LocalRowStore(num_classes, D, optim or SGDConfig(lr=0.1), std=0.5, seed=3)
    full = FullHead(num_classes, D, logit=logit, **kw)
    with torch.no_grad():
        full.weight.copy_(torch.from_numpy(store.read_all()))
    metric = "ip" if logit == "linear" else "cosine"
    sampled = SampledHead(store, sampler_for(sampler_name, num_classes, D, metric),
                          sample_num=num_classes, logit=logit, interval=2, **kw)
    return store, full, sampled


@pytest.mark.parametrize("logit,kw", LOGITS)
@pytest.mark.parametrize("sampler_name", ["permuting", "exact"])
def test_sampled_equals_full_loss_and_gradients(logit, kw, sampler_name):
    store, full, sampled = _pair(logit, kw, sampler_name, SGDConfig(lr=1.0))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, D, generator=g)
    y = torch.randint(0, N, (B,), generator=g)
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_s = full(xf, y), sampled(xs, y)
    assert rel_err(out_s.loss.detach(), out_f.loss.detach()) <= 1e-5
    assert torch.equal(out_s.logits.argmax(1) == out_s.target,
                       out_f.logits.argmax(1) == out_f.target)
    out_f.loss.backward()
    w0 = store.read_all()
    out_s.loss.backward()  # pushes grad W_S: lr 1, no momentum -> w1 = w0 - grad
    assert rel_err(xs.grad, xf.grad) <= 1e-5
    row_grad = torch.from_numpy(w0 - store.read_all())
    assert rel_err(row_grad, full.weight.grad) <= 1e-5


@pytest.mark.parametrize("logit,kw", LOGITS)
@pytest.mark.parametrize("sampler_name", ["permuting", "exact"])
def test_sampled_equals_full_after_five_sgd_steps(logit, kw, sampler_name):
    cfg = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    store, full, sampled = _pair(logit, kw, sampler_name, SGDConfig(**cfg))
    opt = torch.optim.SGD(full.parameters(), **cfg)
    g = torch.Generator().manual_seed(7)
    for step in range(5):
        x = torch.randn(B, D, generator=g)
        y = torch.randint(0, N, (B,), generator=g)
        xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        opt.zero_grad()
        lf = full(xf, y).loss
        lf.backward()
        opt.step()
        ls = sampled(xs, y).loss
        ls.backward()
        assert rel_err(ls.detach(), lf.detach()) <= 1e-5, step
        assert rel_err(xs.grad, xf.grad) <= 1e-5, step
    w_full = full.weight.detach()
    w_sampled = torch.from_numpy(store.read_all())
    assert rel_err(w_sampled, w_full) <= 1e-5
    assert not torch.allclose(w_full, torch.from_numpy(LocalRowStore(N, D, std=0.5, seed=3)
                                                       .read_all()))  # rows did move
    assert sampled.step == 5 and sampled.stats()["rebuilds"] == 3  # steps 0 (initial), 2, 4


def test_sampled_subset_loss_and_untouched_rows():
    num_classes, S = 200, 40
    store = LocalRowStore(num_classes, D, SGDConfig(lr=0.5, momentum=0.9), std=0.3, seed=1)
    head = SampledHead(store, PermutingSampler(num_classes, seed=2), sample_num=S,
                       logit="cosface", s=30.0, m=0.35)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, num_classes, (B,))
    w0 = store.read_all()
    rng_state = head.sampler.rng.bit_generator.state
    out = head(x, y)
    # recompute the selection the head made, and the loss naively over those rows
    head.sampler.rng.bit_generator.state = rng_state
    ids, target = head.sampler.select(x, y, S)
    assert torch.equal(out.target, target) and torch.equal(ids[target], y)
    assert out.logits.shape == (B, S)
    ref = F.cross_entropy(LogitSpec("cosface", 30.0, 0.35)(x, torch.from_numpy(w0)[ids], target),
                          target)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    w1 = store.read_all()
    changed = np.flatnonzero(np.any(w1 != w0, axis=1))
    assert set(changed.tolist()) <= set(ids.tolist()) and changed.size > B // 2
    with pytest.raises(RuntimeError, match="already pushed"):
        _double_backward(head, x.detach(), y)


def _double_backward(head, x, y):
    out = head(x.requires_grad_(), y)
    out.loss.backward(retain_graph=True)
    out.loss.backward()


def test_logq_correction_offsets_the_random_classes_in_the_loss_only():
    """logq=True: the loss (and so the pushed row gradient) is the cross-entropy over the
    selection with log(#others / #random) added to the random top-up's logits; the logits
    the head returns are the plain ones."""
    num_classes, S, lr = 200, 40, 0.5
    store = LocalRowStore(num_classes, D, SGDConfig(lr=lr), std=0.3, seed=1)
    sampler = build_sampler("exact", num_classes, D, metric="cosine", seed=2, background=False,
                            random_share=0.5)
    head = SampledHead(store, sampler, sample_num=S, logit="cosface", s=30.0, m=0.35,
                       logq=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    y = torch.randint(0, num_classes, (B,), generator=g)
    w0 = store.read_all()
    head.rebuild_index()                                # neighbours from the first step on
    state = sampler.rng.bit_generator.state
    out = head(x, y)
    sampler.rng.bit_generator.state = state             # the selection the head made
    ids, target, off = sampler.select(x.detach(), y, S, log_weights=True)
    fixed = torch.unique(y).numel() + sampler.last_num_neighbours
    assert 0 < fixed < S and not off[:fixed].any()
    torch.testing.assert_close(off[fixed:], torch.full((S - fixed,), float(
        np.log((num_classes - fixed) / (S - fixed)))))
    w_s = torch.from_numpy(w0)[ids].requires_grad_()
    plain = LogitSpec("cosface", 30.0, 0.35)(x.detach(), w_s, target)
    ref = F.cross_entropy(plain + off, target)
    torch.testing.assert_close(out.logits, plain.detach())
    torch.testing.assert_close(out.loss, ref)
    assert float(ref.detach()) > float(F.cross_entropy(plain.detach(), target))
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(torch.from_numpy(w0 - store.read_all())[ids], lr * w_s.grad)
    for bad in (1, "random", None):
        with pytest.raises(ValueError, match="logq must be False, True .* or 'sample'"):
            SampledHead(store, sampler, sample_num=S, logq=bad)


def test_logq_per_sample_offsets_all_but_each_samples_own_classes():
    """logq="sample": for each sample, its label and its own neighbours (its row of the
    index's answer) keep offset 0 and every other selected class gets log((N - a_i) / (S -
    a_i)), a_i its own count; loss and pushed row gradient follow, the logits stay plain."""
    num_classes, S, lr = 200, 40, 0.5
    store = LocalRowStore(num_classes, D, SGDConfig(lr=lr), std=0.3, seed=1)
    sampler = build_sampler("exact", num_classes, D, metric="cosine", seed=2, background=False)
    head = SampledHead(store, sampler, sample_num=S, logit="cosface", s=30.0, m=0.35,
                       logq="sample")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    y = torch.randint(0, num_classes, (B,), generator=g)
    w0 = store.read_all()
    head.rebuild_index()
    state = sampler.rng.bit_generator.state
    out = head(x, y)
    sampler.rng.bit_generator.state = state
    ids, target, own = sampler.select(x.detach(), y, S, log_weights="sample")
    # the samples' own classes, from scratch: label + the ids of its exact nearest rows
    k = own.shape[1] - 1
    near = sampler.query(x.detach(), k)
    off = np.empty((B, S), dtype=np.float32)
    for i in range(B):
        mine = {int(y[i])} | {int(c) for c in near[i] if c in set(ids.tolist())}
        a = len(mine)
        off[i] = [0.0 if int(c) in mine else np.log((num_classes - a) / (S - a)) for c in ids]
    assert (off == 0).sum(1).max() > 1          # some sample has own neighbours selected
    w_s = torch.from_numpy(w0)[ids].requires_grad_()
    plain = LogitSpec("cosface", 30.0, 0.35)(x.detach(), w_s, target)
    ref = F.cross_entropy(plain + torch.from_numpy(off), target)
    torch.testing.assert_close(out.logits, plain.detach())
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(torch.from_numpy(w0 - store.read_all())[ids], lr * w_s.grad)


def test_eval_mode_pushes_nothing_and_set_lr_forwards():
    store = LocalRowStore(N, D, SGDConfig(lr=0.1), seed=4)
    head = SampledHead(store, PermutingSampler(N), sample_num=20)
    w0 = store.read_all()
    head.eval()
    with torch.no_grad():
        out = head(torch.randn(B, D), torch.randint(0, N, (B,)))
    assert out.logits.shape == (B, 20) and head.step == 0
    np.testing.assert_array_equal(store.read_all(), w0)
    head.set_lr(0.025)
    assert store.optim.lr == 0.025
    assert head.state_dict()["_extra_state"] == {"step": 0}
    assert list(head.parameters()) == []


def test_sampled_head_rejects_bad_settings():
    store = LocalRowStore(N, D)
    with pytest.raises(ValueError, match=r"sample_num must be an integer in \[1, 50\]"):
        SampledHead(store, PermutingSampler(N), sample_num=51)
    with pytest.raises(ValueError, match="interval"):
        SampledHead(store, PermutingSampler(N), sample_num=5, interval=-1)


def test_recall_telemetry_counts_true_topk_in_selection():
    store = LocalRowStore(N, D, seed=2)
    head = SampledHead(store, PermutingSampler(N), sample_num=N, recall_every=1, recall_k=5)
    head(torch.randn(B, D), torch.randint(0, N, (B,))).loss.backward()
    assert head.telemetry["recall"] == 1.0  # everything is selected
    head2 = SampledHead(store, PermutingSampler(N), sample_num=B, recall_every=1, recall_k=5)
    head2(torch.randn(B, D), torch.arange(B)).loss.backward()
    assert 0.0 <= head2.telemetry["recall"] < 1.0


def test_index_rebuilt_from_current_rows_every_interval():
    store = LocalRowStore(N, D, SGDConfig(lr=0.5), seed=6)
    sampler = PermutingSampler(N)
    head = SampledHead(store, sampler, sample_num=20, interval=2)
    assert sampler.interval == 2 and head.interval == 2
    snapshots = []
    for step in range(3):
        snapshots.append(store.read_all())
        head(torch.randn(B, D), torch.randint(0, N, (B,))).loss.backward()
    assert len(sampler.built_from) == 2  # steps 0 and 2
    np.testing.assert_array_equal(sampler.built_from[0], snapshots[0])
    np.testing.assert_array_equal(sampler.built_from[1], snapshots[2])
    assert not np.array_equal(snapshots[0], snapshots[2])
    stats = head.stats()
    assert stats["rebuilds"] == 2 and stats["index_age"] == 0 and stats["step"] == 3


def test_coverage_counts_the_negatives_and_how_unevenly_they_fall():
    """Every selected column but the batch's labels is a negative pick: the share of classes
    picked at least once, and the share of picks the 1 % most picked classes took (uniform
    sampling: near 1 %; the same few classes every step: 100 %)."""
    n, s, b = 1000, 40, 8
    store = LocalRowStore(n, D, seed=2)
    head = SampledHead(store, build_sampler("random", n, D, seed=0), sample_num=s)
    labels = torch.arange(b)
    for _ in range(50):
        head(torch.randn(b, D), labels).loss.backward()
    picks = head._picks.copy()
    cov = head.coverage()
    assert picks.sum() == 50 * (s - b) and picks[:b].sum() == 0  # labels are not negatives
    assert cov["coverage"] == pytest.approx(np.count_nonzero(picks) / n)
    assert 0.6 < cov["coverage"] < 0.9                  # 1600 uniform picks of 992 classes
    assert cov["picks_top1pct"] < 0.05
    assert head.coverage()["coverage"] == 0.0 and head._picks.sum() == 0  # reset by default

    class SameNegatives(PermutingSampler):  # the batch's labels + the same classes always
        def select(self, features, labels, sample_num):
            uniq = np.unique(labels.cpu().numpy())
            rest = np.setdiff1d(np.arange(self.num_classes), uniq)[:sample_num - uniq.size]
            ids = np.concatenate([uniq, rest])
            return torch.from_numpy(ids), torch.from_numpy(np.searchsorted(uniq, labels))

    fixed = SampledHead(store, SameNegatives(n), sample_num=s)
    for _ in range(5):
        fixed(torch.randn(b, D), labels).loss.backward()
    cov = fixed.coverage(reset=False)
    assert cov["coverage"] == pytest.approx((s - b) / n)
    assert cov["picks_top1pct"] == pytest.approx(10 / (s - b))  # 10 of the 32 classes
