"""evaluation/: the vectorised protocol equals a naive per-threshold, per-fold loop exactly."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import interpolate
from sklearn.model_selection import KFold

from evaluation import (ACC_THRESHOLDS, VAL_THRESHOLDS, count_below, evaluate, format_table,
                        l2_normalize, pair_distances, threshold_at_far, write_report)


# ----------------------------------------------------------------------------------------
# Naive reference: InsightFace's loops (one threshold at a time, one fold at a time), written
# independently of evaluation/ (own normalisation, own distances, own interpolation).
# ----------------------------------------------------------------------------------------

def naive_distances(emb):
    out = []
    for i in range(0, len(emb), 2):
        a = emb[i] / np.sqrt(np.sum(np.square(emb[i])))
        b = emb[i + 1] / np.sqrt(np.sum(np.square(emb[i + 1])))
        out.append(np.sum(np.square(np.subtract(a, b))))
    return np.array(out)


def naive_accuracy(threshold, dist, same):
    tp = fp = tn = fn = 0
    for d, s in zip(dist, same):
        pred = d < threshold
        tp += pred and s
        fp += pred and not s
        tn += (not pred) and (not s)
        fn += (not pred) and s
    tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / len(dist)


def naive_accuracy_np(threshold, dist, same):
    """InsightFace's calculate_accuracy (numpy inside, one threshold per call)."""
    pred = np.less(dist, threshold)
    tp = np.sum(np.logical_and(pred, same))
    fp = np.sum(np.logical_and(pred, np.logical_not(same)))
    tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(same)))
    fn = np.sum(np.logical_and(np.logical_not(pred), same))
    tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def naive_roc(dist, same, thresholds, folds=10, acc_fn=naive_accuracy_np):
    tprs = np.zeros((folds, len(thresholds)))
    fprs = np.zeros((folds, len(thresholds)))
    accuracy = np.zeros(folds)
    best_thr = np.zeros(folds)
    for f, (train, test) in enumerate(KFold(n_splits=folds, shuffle=False).split(dist)):
        acc_train = np.zeros(len(thresholds))
        for t, thr in enumerate(thresholds):
            acc_train[t] = acc_fn(thr, dist[train], same[train])[2]
        best = 0
        for t in range(len(thresholds)):  # first maximum wins
            if acc_train[t] > acc_train[best]:
                best = t
        for t, thr in enumerate(thresholds):
            tprs[f, t], fprs[f, t], _ = acc_fn(thr, dist[test], same[test])
        accuracy[f] = acc_fn(thresholds[best], dist[test], same[test])[2]
        best_thr[f] = thresholds[best]
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best_thr


def naive_val_far(threshold, dist, same):
    pred = np.less(dist, threshold)
    ta = np.sum(np.logical_and(pred, same))
    fa = np.sum(np.logical_and(pred, np.logical_not(same)))
    return float(ta) / float(np.sum(same)), float(fa) / float(np.sum(np.logical_not(same)))


def naive_interp(far, thresholds, target):
    """Piecewise-linear threshold(FAR), walking the curve point by point."""
    if max(far) < target:
        return 0.0
    lo = 0
    for i in range(len(far)):
        if far[i] <= target:
            lo = i
    if far[lo] == target or lo == len(far) - 1:
        return float(thresholds[lo])
    return float(thresholds[lo] + (target - far[lo]) * (thresholds[lo + 1] - thresholds[lo])
                 / (far[lo + 1] - far[lo]))


def naive_val(dist, same, target, thresholds, folds=10):
    val = np.zeros(folds)
    far = np.zeros(folds)
    for f, (train, test) in enumerate(KFold(n_splits=folds, shuffle=False).split(dist)):
        far_train = np.zeros(len(thresholds))
        for t, thr in enumerate(thresholds):
            far_train[t] = naive_val_far(thr, dist[train], same[train])[1]
        thr = naive_interp(far_train, thresholds, target)
        val[f], far[f] = naive_val_far(thr, dist[test], same[test])
    return np.mean(val), np.std(val), np.mean(far)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------

def random_pairs(num_pairs, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2 * num_pairs, dim)), rng.random(num_pairs) < 0.5


def structured_pairs(num_pairs, dim=16, noise=0.9, seed=0, quantize=None):
    """Same pairs share an identity centre, so the accuracy lands well between 50% and 100%."""
    rng = np.random.default_rng(seed)
    same = rng.random(num_pairs) < 0.5
    emb = np.zeros((2 * num_pairs, dim))
    for i in range(num_pairs):
        c1 = rng.normal(size=dim)
        c2 = c1 if same[i] else rng.normal(size=dim)
        emb[2 * i] = c1 + noise * rng.normal(size=dim)
        emb[2 * i + 1] = c2 + noise * rng.normal(size=dim)
    if quantize:  # coarse low-dim values: few accuracy levels, many tied thresholds
        emb = np.round(emb * quantize) / quantize
    return emb, same


CASES = {
    "random-300": lambda: random_pairs(300, seed=1),
    "structured-300": lambda: structured_pairs(300, seed=2),
    "structured-257-uneven-folds": lambda: structured_pairs(257, noise=1.2, seed=3),
    "structured-quantized-ties": lambda: structured_pairs(200, dim=6, seed=4, quantize=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_accuracy_roc_equal_naive_exactly(case):
    emb, same = CASES[case]()
    result = evaluate(emb, same)
    dist = naive_distances(emb)
    tpr, fpr, acc, best = naive_roc(dist, same, np.arange(0, 4, 0.01))
    assert result.fold_accuracies == acc.tolist()  # exact, not approx
    assert result.accuracy == np.mean(acc) and result.accuracy_std == np.std(acc)
    assert result.fold_thresholds == best.tolist()
    assert result.tpr == tpr.tolist() and result.fpr == fpr.tolist()
    if case.startswith("structured"):
        assert 0.6 < result.accuracy < 0.999, result.accuracy  # not trivially 50% or 100%


@pytest.mark.parametrize("case", ["random-300", "structured-300", "structured-quantized-ties"])
def test_val_equal_naive(case):
    emb, same = CASES[case]()
    result = evaluate(emb, same)
    val, val_std, far = naive_val(naive_distances(emb), same, 1e-3, np.arange(0, 4, 0.001))
    assert (result.val, result.val_std, result.far) == (val, val_std, far)  # exact


def test_fully_plain_python_reference_small():
    """A second reference without any numpy inside the per-threshold loop."""
    emb, same = structured_pairs(40, dim=8, seed=5)
    result = evaluate(emb, same)
    tpr, fpr, acc, best = naive_roc(naive_distances(emb), same,
                                    np.arange(0, 4, 0.01), acc_fn=_listwise)
    assert result.fold_accuracies == acc.tolist()
    assert result.fold_thresholds == best.tolist()
    assert result.tpr == tpr.tolist()


def _listwise(thr, dist, same):
    return naive_accuracy(thr, list(dist), [bool(s) for s in np.asarray(same)])


def test_best_threshold_tie_break_is_first_maximum():
    # distances 0.5 (same) and 1.5 (different): every threshold in (0.5, 1.5] separates
    # perfectly; InsightFace's argmax picks the smallest, 0.51.
    same = np.array([True, False] * 10)
    a = np.tile([1.0, 0.0], (40, 1))
    emb = a.copy()
    for i, s in enumerate(same):
        angle = np.arccos(1 - (0.5 if s else 1.5) / 2)  # squared chord length = 2 - 2cos
        emb[2 * i + 1] = [np.cos(angle), np.sin(angle)]
    result = evaluate(emb, same)
    assert result.accuracy == 1.0
    assert result.fold_thresholds == [ACC_THRESHOLDS[51]] * 10
    assert result.best_threshold == ACC_THRESHOLDS[51]


def test_threshold_at_far_matches_scipy_slinear_without_plateaus():
    rng = np.random.default_rng(0)
    far = np.sort(rng.random(50))
    far[0] = 0.0
    thr = np.sort(rng.random(50)) * 4
    f = interpolate.interp1d(far, thr, kind="slinear")
    for target in [1e-3, 0.05, 0.31, far[7], far[-1]]:
        if target <= far[-1]:
            assert threshold_at_far(far, thr, target) == pytest.approx(float(f(target)),
                                                                       rel=1e-12, abs=1e-15)


def test_threshold_at_far_with_plateaus_and_unreachable_target():
    far = np.array([0, 0, 0, 0.1, 0.1, 0.5, 1.0])
    thr = np.arange(7) * 0.001
    assert threshold_at_far(far, thr, 0.05) == pytest.approx(0.0025)  # between last 0, first 0.1
    assert threshold_at_far(far, thr, 0.1) == pytest.approx(0.004)    # largest of the plateau
    assert threshold_at_far(far, thr, 0.0) == pytest.approx(0.002)
    assert threshold_at_far(np.zeros(5), np.arange(5.0), 1e-3) == 0.0  # never reached


def test_count_below_is_strict_and_blocked(monkeypatch):
    import evaluation.verification as v

    dist = np.array([0.0, 0.5, 0.5, 1.0, 3.99])
    thr = np.array([0.0, 0.5, 0.51, 4.0])
    assert count_below(dist, thr).tolist() == [0, 1, 3, 5]
    monkeypatch.setattr(v, "_BLOCK_ELEMENTS", 4)  # forces one pair per block
    assert count_below(dist, thr).tolist() == [0, 1, 3, 5]


def test_normalisation_and_distances():
    emb = np.array([[3.0, 4.0], [6.0, 8.0], [1.0, 0.0], [0.0, 2.0]])
    assert np.allclose(np.linalg.norm(l2_normalize(emb), axis=1), 1.0)
    assert np.allclose(pair_distances(emb), [0.0, 2.0])


@pytest.mark.parametrize("emb, same, match", [
    (np.zeros((5, 4)), [True, False], "expected 4 rows"),
    (np.ones((4,)), [True, False], "2-D"),
    (np.full((4, 3), np.nan), [True, False], "NaN or inf"),
    (np.ones((4, 3)), [[True, False]], "1-D"),
    (np.ones((4, 3)), ["a", "b"], "booleans"),
    (np.ones((40, 3)), [True] * 20, "both same and different"),
    (np.ones((10, 3)), [True, False] * 2 + [True], "cannot be split into 10 folds"),
])
def test_clear_errors(emb, same, match):
    with pytest.raises(ValueError, match=match):
        evaluate(emb, same)


def test_zero_embedding_row_is_an_error():
    emb, same = random_pairs(20)
    emb[3] = 0
    with pytest.raises(ValueError, match="all zeros"):
        evaluate(emb, same)


def test_bad_arguments():
    emb, same = random_pairs(20)
    with pytest.raises(ValueError, match="far_target"):
        evaluate(emb, same, far_target=2.0)
    with pytest.raises(ValueError, match="num_folds"):
        evaluate(emb, same, num_folds=0)


def test_structured_beats_random_and_val_sane():
    good = evaluate(*structured_pairs(400, noise=0.5, seed=7))
    bad = evaluate(*random_pairs(400, seed=7))
    assert good.accuracy > 0.95 and bad.accuracy < 0.65
    assert 0 <= bad.val <= 1 and good.val > bad.val
    assert good.far <= 0.01  # held-out FAR near the 1e-3 target
    assert good.auc > 0.97 and 0.3 < bad.auc < 0.7
    assert len(good.tpr) == len(ACC_THRESHOLDS) and len(good.fold_val_thresholds) == 10
    assert all(0 <= t < 4 for t in good.fold_val_thresholds)
    assert VAL_THRESHOLDS.shape == (4000,)


def test_report_files_and_table(tmp_path):
    result = evaluate(*structured_pairs(100, seed=8))
    paths = write_report(result, tmp_path / "out", name="lfw", model="m.pth")
    data = json.loads(paths["json"].read_text())
    assert data["name"] == "lfw" and data["model"] == "m.pth"
    assert data["accuracy"] == result.accuracy and len(data["tpr"]) == 400
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temps
    # World-readable like a plain open() (mkstemp alone would leave them 0600).
    assert {oct(p.stat().st_mode & 0o777) for p in paths.values()} == {"0o644"}
    table = format_table({"lfw": result, "cfp_fp": result})
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["name", "pairs"] and "VAL@FAR=0.001" in lines[0]
    assert lines[2].startswith("lfw") and lines[3].startswith("cfp_fp")
    assert f"{100 * result.accuracy:.2f} ± {100 * result.accuracy_std:.2f}" in lines[2]


def test_evaluation_never_imports_torch():
    code = ("import sys, numpy as np, evaluation; "
            "evaluation.evaluate(np.random.default_rng(0).normal(size=(40, 4)), [True, False]*10);"
            "bad = [m for m in ('torch', 'hfsoftmax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_free_cli_on_saved_features(tmp_path, capsys):
    from evaluation.__main__ import main
    from evaluation import issame_path, table_row

    emb, same = structured_pairs(120, seed=9)
    np.save(tmp_path / "lfw.npy", emb.astype(np.float32))
    np.save(issame_path(tmp_path / "lfw.npy"), same)
    assert main([str(tmp_path / "lfw.npy"), "--out-dir", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    expected = evaluate(emb.astype(np.float32), same)
    assert " ".join(table_row("lfw", expected)) in " ".join(out.split())
    assert json.loads((tmp_path / "rep" / "lfw.json").read_text())["accuracy"] == \
        expected.accuracy
    np.save(tmp_path / "alone.npy", emb)
    assert main([str(tmp_path / "alone.npy")]) == 2
    assert "alone_issame.npy" in capsys.readouterr().err
