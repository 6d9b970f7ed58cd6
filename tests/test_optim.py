"""The numpy SGD (paramserver.optim / Table) against torch.optim.SGD, in process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from paramserver import SGDConfig, Table, reduce_duplicate_rows, sgd_rows
from paramserver.table import init_rows

torch.set_num_threads(1)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max relative error: the largest |a - b| over the largest |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("nesterov", [False, True])
def test_dense_matches_torch_sgd(nesterov):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((30, 7)).astype(np.float32)
    cfg = SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    w, buf = w0.copy(), np.zeros_like(w0)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    for step in range(20):
        if step == 10:
            cfg.lr = 0.01
            opt.param_groups[0]["lr"] = 0.01
        g = rng.standard_normal(w0.shape).astype(np.float32)
        sgd_rows(w, buf, np.arange(30), g, cfg)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    assert rel_err(w, p.detach().numpy()) <= 1e-5
    assert rel_err(buf, opt.state[p]["momentum_buffer"].numpy()) <= 1e-5


def test_sparse_lazy_rows_match_per_row_torch_sgd():
    """Lazy updates: each row evolves like its own torch parameter, stepped only when pushed;
    duplicate ids accumulate like autograd's index backward."""
    rng = np.random.default_rng(1)
    n, d = 25, 5
    w0 = rng.standard_normal((n, d)).astype(np.float32)
    cfg = SGDConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    table = Table("t", n, d, weight=w0.copy(), optim=cfg)
    params = [torch.nn.Parameter(torch.from_numpy(w0[i].copy())) for i in range(n)]
    opts = [torch.optim.SGD([q], lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
            for q in params]
    for step in range(20):
        if step == 10:
            table.optim = SGDConfig(lr=0.2, momentum=0.9, weight_decay=5e-4, nesterov=True)
            for o in opts:
                o.param_groups[0]["lr"] = 0.2
        rows = rng.integers(0, n, size=12)  # duplicates likely
        g = rng.standard_normal((12, d)).astype(np.float32)
        table.apply_grad(rows, g)
        for r in np.unique(rows):
            params[r].grad = torch.from_numpy(g[rows == r].sum(axis=0))
            opts[r].step()
    ref = np.stack([q.detach().numpy() for q in params])
    assert rel_err(table.weight, ref) <= 1e-5
    untouched = [i for i in range(n) if opts[i].state.get(params[i]) is None]
    np.testing.assert_array_equal(table.weight[untouched], w0[untouched])
    assert table.updates == 20


def test_reduce_duplicate_rows_sums_like_autograd():
    rows = np.array([3, 1, 3, 0, 3])
    g = np.arange(10, dtype=np.float32).reshape(5, 2)
    u, s = reduce_duplicate_rows(rows, g)
    assert u.tolist() == [0, 1, 3]
    w = torch.zeros(4, 2, requires_grad=True)
    (w[torch.from_numpy(rows)] * torch.from_numpy(g)).sum().backward()
    np.testing.assert_array_equal(s, w.grad.numpy()[u])


def test_table_rejects_bad_input_without_changing_anything():
    t = Table("t", 10, 3, seed=3)
    before = t.checksum()
    with pytest.raises(IndexError, match="row 10 outside"):
        t.apply_grad(np.array([1, 10]), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="not finite"):
        t.apply_grad(np.array([1, 2]), np.array([[1, 2, 3], [np.nan, 0, 0]], np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        t.apply_grad(np.array([1, 2]), np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="not finite"):
        t.set_rows(np.array([0]), np.full((1, 3), np.inf, np.float32))
    assert t.checksum() == before and t.updates == 0


def test_sgd_config_validation_names_the_setting():
    with pytest.raises(ValueError, match="lr"):
        SGDConfig(lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGDConfig(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="unknown SGD settings"):
        SGDConfig.from_dict({"lr": 0.1, "dampening": 0.1})


def test_init_is_independent_of_sharding():
    whole = init_rows("normal", 0, 10000, 4, 0.01, 7)
    parts = [init_rows("normal", a, b, 4, 0.01, 7) for a, b in [(0, 3333), (3333, 6666),
                                                                 (6666, 10000)]]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    u = init_rows("uniform", 100, 5000, 3, 0.5, 1)
    assert u.dtype == np.float32 and np.abs(u).max() <= 0.5 and u.std() > 0.2


def test_overflowing_sum_of_duplicate_rows_is_refused_and_changes_nothing():
    """Each gradient is finite (3e38 < float32 max ~3.4e38) but the two of row 12 sum to
    inf: the step is refused naming the (global) row, weights and momentum untouched."""
    from paramserver import NonFiniteUpdateError

    t = Table("t", 10, 3, seed=3, row_start=10, global_rows=30,
              optim=SGDConfig(lr=0.1, momentum=0.9))
    t.apply_grad(np.array([0, 2]), np.ones((2, 3), np.float32))  # momentum buffers non-zero
    before, updates = t.checksum(), t.updates
    g = np.array([[1, 1, 1], [3e38, 0, 0], [3e38, 0, 0]], np.float32)
    assert np.isfinite(g).all()
    for apply in (lambda: t.apply_grad(np.array([1, 2, 2]), g),   # sgd_rows' check
                  lambda: t.check_grads(np.array([1, 2, 2]), g)):  # the server's, per push
        with pytest.raises(NonFiniteUpdateError,
                           match=r"table 't': the 2 gradients of row 12 sum past the float32 "
                                 r"range.*nothing was changed: scale the gradients down") as e:
            apply()
        assert e.value.row == 12
        assert isinstance(e.value, ValueError) and isinstance(e.value, FloatingPointError)
    assert t.checksum() == before and t.updates == updates
    # Sums that stay in range are fine, in any order of the entries.
    g2 = np.array([[3e38, 0, 0], [-3e38, 0, 0], [3e38, 0, 0]], np.float32)
    t.check_grads(np.array([2, 2, 2]), g2)
    t.apply_grad(np.array([2, 2, 2]), g2)
    assert np.isfinite(t.weight).all() and t.updates == updates + 1


def test_update_that_overflows_momentum_is_refused_and_changes_nothing():
    """A finite summed gradient whose momentum update (0.9 * 3e38 + 3e38) leaves float32 is
    refused by the same check in sgd_rows, before weights or momentum are written."""
    from paramserver import NonFiniteUpdateError

    w = np.zeros((4, 2), np.float32)
    buf = np.zeros_like(w)
    cfg = SGDConfig(lr=0.1, momentum=0.9)
    big = np.full((1, 2), 3e38, np.float32)
    sgd_rows(w, buf, np.array([1]), big, cfg)
    assert np.isfinite(buf).all() and buf[1, 0] == np.float32(3e38)
    w0, buf0 = w.copy(), buf.copy()
    with pytest.raises(NonFiniteUpdateError, match=r"update of row 5 leaves the float32 "
                                                   r"range.*momentum=0.9") as e:
        sgd_rows(w, buf, np.array([0, 1]), np.r_[np.ones((1, 2), np.float32), big], cfg,
                 row_offset=4)
    assert e.value.row == 5
    np.testing.assert_array_equal(w, w0)      # row 0 (fine) is not written either
    np.testing.assert_array_equal(buf, buf0)


def test_renorm_rescales_updated_rows_only_and_keeps_the_sgd_direction():
    """renorm > 0: each updated row is torch's SGD result rescaled to that norm; rows not
    pushed keep their values (and norms); a zero row stays zero."""
    rng = np.random.default_rng(5)
    w0 = (0.1 * rng.standard_normal((12, 6))).astype(np.float32)
    w0[7] = 0.0
    plain = SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
    cfg = SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, renorm=2.0)
    rows, g = np.array([1, 4, 4, 9]), rng.standard_normal((4, 6)).astype(np.float32)
    w_ref, buf_ref = w0.copy(), np.zeros_like(w0)
    w, buf = w0.copy(), np.zeros_like(w0)
    sgd_rows(w_ref, buf_ref, rows, g, plain)
    sgd_rows(w, buf, rows, g, cfg)
    for r in (1, 4, 9):
        assert np.linalg.norm(w[r]) == pytest.approx(2.0, rel=1e-6)
        np.testing.assert_allclose(w[r], 2.0 * w_ref[r] / np.linalg.norm(w_ref[r]), rtol=1e-5)
    untouched = [r for r in range(12) if r not in (1, 4, 9)]
    np.testing.assert_array_equal(w[untouched], w0[untouched])
    np.testing.assert_array_equal(buf, buf_ref)  # the momentum is torch's, unscaled
    sgd_rows(w, buf, np.array([7]), np.zeros((1, 6), np.float32), cfg)
    assert not w[7].any()
    assert SGDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="SGD renorm must be finite and >= 0"):
        SGDConfig(renorm=-1.0)


def test_max_norm_caps_updated_rows_like_torch_renorm():
    """max_norm > 0: updated rows above the cap are scaled down to it exactly as
    ``torch.renorm(w, 2, 0, max_norm)`` scales them; updated rows below it are torch's SGD
    result unchanged; rows not pushed keep their values even above the cap."""
    rng = np.random.default_rng(6)
    w0 = rng.standard_normal((10, 8)).astype(np.float32)
    w0 *= np.float32([0.05, 3.0, 0.05, 3.0, 0.05, 3.0, 0.05, 3.0, 0.0, 3.0])[:, None]
    plain = SGDConfig(lr=0.1, weight_decay=5e-4, catchup_decay=True)
    cfg = SGDConfig(lr=0.1, weight_decay=5e-4, catchup_decay=True, max_norm=1.0)
    rows = np.array([0, 1, 2, 3, 8])
    g = (0.1 * rng.standard_normal((5, 8))).astype(np.float32)
    w_ref, w = w0.copy(), w0.copy()
    sgd_rows(w_ref, None, rows, g, plain)
    sgd_rows(w, None, rows, g, cfg)
    capped = torch.renorm(torch.from_numpy(w_ref[rows]), 2, 0, 1.0).numpy()
    np.testing.assert_allclose(w[rows], capped, rtol=1e-6, atol=1e-7)
    norms = np.linalg.norm(w_ref[rows], axis=1)
    assert (norms[[0, 2]] < 1).all() and (norms[[1, 3]] > 1).all()  # both cases are hit
    np.testing.assert_array_equal(w[[0, 2]], w_ref[[0, 2]])          # below the cap: as is
    assert np.linalg.norm(w[[1, 3]], axis=1) == pytest.approx(1.0, rel=1e-6)
    untouched = [4, 5, 6, 7, 9]
    np.testing.assert_array_equal(w[untouched], w0[untouched])
    assert np.linalg.norm(w[5]) > 1                                   # not pushed: not capped
    assert SGDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"renorm=1.0 .* max_norm=2.0 .* exclude each other"):
        SGDConfig(renorm=1.0, max_norm=2.0)
    with pytest.raises(ValueError, match="SGD max_norm must be finite and >= 0"):
        SGDConfig(max_norm=float("inf"))


def _dense_reference(w0, pushes, lrs, wd):
    """torch.optim.SGD (momentum 0) on the whole matrix, a zero gradient for rows not
    pushed: every row decays every step."""
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([p], lr=lrs[0], weight_decay=wd)
    for (rows, g), lr in zip(pushes, lrs):
        opt.param_groups[0]["lr"] = lr
        dense = np.zeros_like(w0)
        np.add.at(dense, rows, g)
        p.grad = torch.from_numpy(dense)
        opt.step()
    return p.detach().numpy()


def test_catchup_decay_equals_dense_sgd_and_survives_a_snapshot(tmp_path):
    """catchup_decay: sparse pushes (duplicates, an LR change, a snapshot and restore in the
    middle) read back as a dense torch SGD's rows, where the lazy table differs; the stored
    rows are not touched until pushed."""
    from paramserver.snapshot import read_snapshot, write_snapshot

    rng = np.random.default_rng(7)
    n, d, wd = 40, 6, 0.05
    w0 = rng.standard_normal((n, d)).astype(np.float32)
    pushes = [(rng.integers(0, n, size=6), rng.standard_normal((6, d)).astype(np.float32))
              for _ in range(30)]
    lrs = [0.5] * 15 + [0.1] * 15
    table = Table("t", n, d, weight=w0.copy(),
                  optim=SGDConfig(lr=0.5, weight_decay=wd, catchup_decay=True))
    lazy = Table("t", n, d, weight=w0.copy(), optim=SGDConfig(lr=0.5, weight_decay=wd))
    for step, ((rows, g), lr) in enumerate(zip(pushes, lrs)):
        if step == 15:
            table.optim = SGDConfig(lr=lr, weight_decay=wd, catchup_decay=True)
            lazy.optim = SGDConfig(lr=lr, weight_decay=wd)
        if step == 20:  # the file holds values: restored, the run goes on alike
            before = table.read(0, n)
            write_snapshot(tmp_path / "s.safetensors", {"t": table})
            table = read_snapshot(tmp_path / "s.safetensors")[0]["t"]
            np.testing.assert_array_equal(table.read(0, n), before)
            assert table.optim.catchup_decay
        table.apply_grad(rows, g)
        lazy.apply_grad(rows, g)
    ref = _dense_reference(w0, pushes, lrs, wd)
    assert rel_err(table.read(0, n), ref) <= 1e-5
    np.testing.assert_array_equal(table.pull(np.arange(n)), table.read(0, n))
    assert rel_err(lazy.read(0, n), ref) > 1e-2  # what the catch-up changes
    never = np.setdiff1d(np.arange(n), np.concatenate([r for r, _ in pushes[20:]]))
    assert never.size  # rows not pushed since the restore: stored as restored, read decayed
    np.testing.assert_array_equal(table.weight[never], before[never])
    assert np.all(np.abs(table.read(0, n)[never]) < np.abs(before[never]))


def test_catchup_decay_refused_step_and_switching_off_change_no_value():
    """A refused step leaves values, marks and clock as they were (same checksum); turning
    the catch-up off writes the owed decay in, so no value jumps; set rows owe nothing."""
    n, d = 8, 3
    table = Table("t", n, d, weight=np.ones((n, d), np.float32),
                  optim=SGDConfig(lr=0.5, weight_decay=0.1, catchup_decay=True))
    for _ in range(3):
        table.apply_grad(np.array([0]), np.zeros((1, d), np.float32))
    values, digest = table.read(0, n), table.checksum()
    np.testing.assert_allclose(values[1], 0.95 ** 3, rtol=1e-6)  # decayed, never pushed
    with pytest.raises(ValueError, match="row 2"):
        table.apply_grad(np.array([2]), np.full((1, d), np.inf, np.float32))
    with pytest.raises(ValueError, match="row 3 sum past the float32 range"):
        table.apply_grad(np.array([3, 3]), np.full((2, d), 3e38, np.float32), check=False)
    assert table.checksum() == digest
    np.testing.assert_array_equal(table.read(0, n), values)
    table.set_rows(np.array([4]), np.full((1, d), 2.0, np.float32))
    table.apply_grad(np.array([0]), np.zeros((1, d), np.float32))
    np.testing.assert_allclose(table.read(4, 5), 2.0 * 0.95, rtol=1e-6)  # one step's decay
    values = table.read(0, n)
    table.optim = SGDConfig(lr=0.5, weight_decay=0.1)  # off: the stored rows take the decay
    np.testing.assert_array_equal(table.weight, values)
    table.apply_grad(np.array([0]), np.zeros((1, d), np.float32))
    np.testing.assert_array_equal(table.read(1, n), values[1:])  # lazy again: rows wait


def test_catchup_decay_settings_are_checked():
    for bad, match in [(dict(momentum=0.9), "catchup_decay=True needs momentum 0"),
                       (dict(lr=10.0, weight_decay=0.1), "lr \\* weight_decay < 1"),
                       (dict(catchup_decay=1), "catchup_decay must be true or false")]:
        with pytest.raises(ValueError, match=match):
            SGDConfig(**{"catchup_decay": True, **bad})
    cfg = SGDConfig(lr=0.1, weight_decay=5e-4, catchup_decay=True)
    assert SGDConfig.from_dict(cfg.to_dict()) == cfg
    assert not SGDConfig.from_dict({"lr": 0.1}).catchup_decay  # older settings: off
