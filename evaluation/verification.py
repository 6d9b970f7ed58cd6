"""Face verification on embeddings of image pairs, with InsightFace's protocol.

The protocol of InsightFace's ``recognition/arcface_torch/eval/verification.py`` (itself
from David Sandberg's facenet), re-implemented here with every threshold evaluated at once:

- the embeddings are L2-normalised and pair ``i`` is rows ``2i`` and ``2i+1``; a pair is
  predicted "same" when the squared L2 distance of its two embeddings is strictly below
  the threshold;
- accuracy: thresholds ``np.arange(0, 4, 0.01)``; the pairs are cut into 10 contiguous
  folds (``sklearn.model_selection.KFold`` without shuffling); for each fold the threshold
  with the best accuracy on the nine other folds (``argmax``: the first, i.e. smallest, of
  tied thresholds) is applied to the held-out fold; the report is the mean and the
  (population) standard deviation of the ten held-out accuracies;
- ROC: the true- and false-positive rates of each held-out fold at every threshold,
  averaged over the folds;
- VAL@FAR: thresholds ``np.arange(0, 4, 0.001)``; for each fold the threshold at which the
  nine training folds' FAR equals the target is found by linear interpolation of the
  threshold as a function of FAR (``threshold 0`` where the training FAR never reaches the
  target), and the held-out fold's VAL (true accept rate) and FAR are measured at it.

>>> import numpy as np
>>> from evaluation import evaluate
>>> rng = np.random.default_rng(0)
>>> result = evaluate(rng.normal(size=(200, 8)), rng.random(100) < 0.5)
>>> round(result.accuracy, 3) <= 1.0
True
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: InsightFace's accuracy/ROC thresholds on the squared distance (400 values, 0 to 3.99).
ACC_THRESHOLDS = np.arange(0, 4, 0.01)
#: InsightFace's VAL@FAR thresholds (4000 values, 0 to 3.999).
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
DEFAULT_FOLDS = 10
DEFAULT_FAR_TARGET = 1e-3
# Largest (thresholds x pairs) boolean block built at once; bounds the memory of the
# broadcast comparison for very large pair sets (about 32 MB).
_BLOCK_ELEMENTS = 1 << 25


@dataclass
class VerificationResult:
    """Everything one verification run measured (see the module docstring for the protocol).

    ``accuracy``/``accuracy_std``: mean and std of the held-out fold accuracies;
    ``fold_thresholds``: the threshold chosen on each fold's training part;
    ``best_threshold``: the threshold with the best accuracy over all pairs (the one to
    deploy; smallest of ties); ``val``/``val_std``/``far`` at ``far_target``;
    ``tpr``/``fpr``: the fold-averaged ROC at ``thresholds``; ``auc``: area under it.
    """

    num_pairs: int
    num_same: int
    num_folds: int
    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    best_threshold: float
    far_target: float
    val: float
    val_std: float
    far: float
    fold_val_thresholds: list[float]
    auc: float
    thresholds: list[float] = field(repr=False)
    tpr: list[float] = field(repr=False)
    fpr: list[float] = field(repr=False)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of all fields (plain floats and lists)."""
        return asdict(self)


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in float64 (as InsightFace's evaluation computes).

    Raises ``ValueError`` on a zero row, which has no direction to compare.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.sqrt(np.sum(np.square(x), axis=1, keepdims=True))
    if np.any(norms == 0):
        bad = np.flatnonzero(norms[:, 0] == 0)[:5].tolist()
        raise ValueError(f"embeddings rows {bad} are all zeros and cannot be L2-normalised; "
                         "check the model's output")
    return x / norms


def check_pairs(embeddings: np.ndarray, issame: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(embeddings (2P, D), issame (P,))`` and return them as float64 / bool arrays."""
    emb = np.asarray(embeddings)
    same = np.asarray(issame)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array (2P, D) with pair i in rows "
                         f"2i and 2i+1; got shape {emb.shape}")
    if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
        raise ValueError(f"embeddings must be numeric; got dtype {emb.dtype}")
    if same.ndim != 1:
        raise ValueError(f"issame must be 1-D (one bool per pair); got shape {same.shape}")
    if same.dtype != np.bool_:
        if not (np.issubdtype(same.dtype, np.integer) and np.isin(same, (0, 1)).all()):
            raise ValueError(f"issame must hold booleans (or 0/1); got dtype {same.dtype}")
        same = same.astype(bool)
    if emb.shape[0] != 2 * same.shape[0]:
        raise ValueError(f"embeddings have {emb.shape[0]} rows but issame has {same.shape[0]} "
                         f"pairs; expected {2 * same.shape[0]} rows (two per pair)")
    emb = emb.astype(np.float64, copy=False)
    if not np.isfinite(emb).all():
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))[:5].tolist()
        raise ValueError(f"embeddings hold NaN or inf (rows {bad} ...); the model diverged or "
                         "the input is corrupt")
    return emb, same


def pair_distances(embeddings: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Squared L2 distance of each pair (rows 2i, 2i+1), after L2 normalisation by default."""
    emb = l2_normalize(embeddings) if normalize else np.asarray(embeddings, dtype=np.float64)
    diff = np.subtract(emb[0::2], emb[1::2])
    return np.sum(np.square(diff), axis=1)


def count_below(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For every threshold at once, how many distances are strictly below it (int64 (T,)).

    A broadcast comparison ``dist[None, :] < thresholds[:, None]`` summed over the pairs,
    done in blocks of pairs so the temporary stays small for large sets.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    counts = np.zeros(thresholds.shape[0], dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // max(1, thresholds.shape[0]))
    for start in range(0, dist.shape[0], step):
        block = dist[start:start + step]
        counts += np.count_nonzero(block[None, :] < thresholds[:, None], axis=1)
    return counts


def _fold_splits(num_pairs: int, num_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold

    if num_folds < 2:
        idx = np.arange(num_pairs)
        return [(idx, idx)]  # InsightFace's LFold: one "fold" trains and tests on everything
    if num_pairs < num_folds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {num_folds} folds; use at least "
                         f"{num_folds} pairs or fewer folds")
    return list(KFold(n_splits=num_folds, shuffle=False).split(np.arange(num_pairs)))


def _group_counts(dist, same, splits, thresholds):
    """Per fold: (accepted same, accepted different, #same, #different) of its TEST part.

    Counts of the training part follow as totals minus the fold's (integers, exact).
    """
    acc_same = np.stack([count_below(dist[test][same[test]], thresholds) for _, test in splits])
    acc_diff = np.stack([count_below(dist[test][~same[test]], thresholds) for _, test in splits])
    n_same = np.array([np.count_nonzero(same[test]) for _, test in splits], dtype=np.int64)
    n_diff = np.array([test.shape[0] for _, test in splits], dtype=np.int64) - n_same
    return acc_same, acc_diff, n_same, n_diff


def _rates(tp, fp, n_same, n_diff):
    """TPR and FPR with InsightFace's convention: 0 where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.where(n_same > 0, tp / np.maximum(n_same, 1), 0.0)
        fpr = np.where(n_diff > 0, fp / np.maximum(n_diff, 1), 0.0)
    return tpr, fpr


def calculate_roc(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = ACC_THRESHOLDS,
                  num_folds: int = DEFAULT_FOLDS):
    """10-fold accuracy and the fold-averaged ROC from pair distances.

    Returns ``(tpr (T,), fpr (T,), accuracy (F,), fold_thresholds (F,))``.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    splits = _fold_splits(dist.shape[0], num_folds)
    acc_same, acc_diff, n_same, n_diff = _group_counts(dist, issame, splits, thresholds)
    total_same, total_diff = acc_same.sum(0), acc_diff.sum(0)
    tprs = np.zeros((len(splits), thresholds.shape[0]))
    fprs = np.zeros((len(splits), thresholds.shape[0]))
    accuracy = np.zeros(len(splits))
    fold_thresholds = np.zeros(len(splits))
    for f, (train, test) in enumerate(splits):
        if num_folds < 2:
            tr_same, tr_diff, tr_nd = acc_same[f], acc_diff[f], n_diff[f]
        else:
            tr_same, tr_diff = total_same - acc_same[f], total_diff - acc_diff[f]
            tr_nd = n_diff.sum() - n_diff[f]
        # accuracy = (true accepts + true rejects) / size, for all thresholds at once
        acc_train = (tr_same + (tr_nd - tr_diff)) / train.shape[0]
        best = int(np.argmax(acc_train))  # first maximum: the smallest tied threshold
        tprs[f], fprs[f] = _rates(acc_same[f], acc_diff[f], n_same[f], n_diff[f])
        accuracy[f] = (acc_same[f][best] + (n_diff[f] - acc_diff[f][best])) / test.shape[0]
        fold_thresholds[f] = thresholds[best]
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, fold_thresholds


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """The threshold at which a non-decreasing FAR curve reaches ``far_target``.

    Linear interpolation of the threshold as a function of FAR, as InsightFace's
    ``interp1d(far_train, thresholds, kind='slinear')``: between the last threshold whose
    FAR is below the target and the next one; where a run of thresholds has exactly the
    target FAR, the largest of them. (SciPy >= 1.11 rejects the repeated FAR values that
    every real curve has, so InsightFace's call no longer runs; this is the value its
    linear spline gave, computed directly.) Returns 0.0 where the FAR never reaches the
    target, as InsightFace does.
    """
    far = np.asarray(far, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if far.shape[0] == 0 or far.max() < far_target:
        return 0.0
    if far_target < far[0]:
        # below the curve's range: interp1d raises here; the smallest threshold is the
        # strictest one available
        return float(thresholds[0])
    lo = int(np.searchsorted(far, far_target, side="right")) - 1  # last FAR <= target
    if far[lo] == far_target or lo + 1 >= far.shape[0]:
        return float(thresholds[lo])
    x0, x1 = far[lo], far[lo + 1]
    y0, y1 = thresholds[lo], thresholds[lo + 1]
    return float(y0 + (far_target - x0) * (y1 - y0) / (x1 - x0))


def calculate_val(dist: np.ndarray, issame: np.ndarray, far_target: float = DEFAULT_FAR_TARGET,
                  thresholds: np.ndarray = VAL_THRESHOLDS, num_folds: int = DEFAULT_FOLDS):
    """VAL (true accept rate) at a target FAR, 10-fold.

    Returns ``(val_mean, val_std, far_mean, fold_thresholds (F,))``. A held-out fold with
    no same (different) pairs counts VAL (FAR) 0 there, InsightFace's convention for TPR.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    splits = _fold_splits(dist.shape[0], num_folds)
    acc_same, acc_diff, n_same, n_diff = _group_counts(dist, issame, splits, thresholds)
    total_diff = acc_diff.sum(0)
    val = np.zeros(len(splits))
    far = np.zeros(len(splits))
    fold_thresholds = np.zeros(len(splits))
    for f, (_, test) in enumerate(splits):
        tr_diff = acc_diff[f] if num_folds < 2 else total_diff - acc_diff[f]
        tr_nd = n_diff[f] if num_folds < 2 else n_diff.sum() - n_diff[f]
        if tr_nd == 0:
            raise ValueError(f"fold {f}: the training folds hold no different-identity pairs, "
                             "so FAR is undefined; the pair list needs different pairs spread "
                             "over the folds")
        far_train = tr_diff / tr_nd
        thr = threshold_at_far(far_train, thresholds, far_target)
        fold_thresholds[f] = thr
        d, s = dist[test], issame[test]
        accept = d < thr
        ta = np.count_nonzero(accept & s)
        fa = np.count_nonzero(accept & ~s)
        val[f] = ta / n_same[f] if n_same[f] else 0.0
        far[f] = fa / n_diff[f] if n_diff[f] else 0.0
    return float(np.mean(val)), float(np.std(val)), float(np.mean(far)), fold_thresholds


def _best_threshold(dist, issame, thresholds):
    acc_same = count_below(dist[issame], thresholds)
    acc_diff = count_below(dist[~issame], thresholds)
    n_diff = np.count_nonzero(~issame)
    acc = (acc_same + (n_diff - acc_diff)) / dist.shape[0]
    return float(thresholds[int(np.argmax(acc))])


def evaluate(embeddings: np.ndarray, issame: Sequence[bool], num_folds: int = DEFAULT_FOLDS,
             far_target: float = DEFAULT_FAR_TARGET, normalize: bool = True) -> VerificationResult:
    """Verification metrics of ``embeddings`` (2P, D) for the pairs ``issame`` (P,).

    Pair ``i`` is rows ``2i`` and ``2i+1`` (the layout of InsightFace's ``.bin`` files).
    ``normalize=False`` skips the L2 normalisation for embeddings already normalised.
    """
    if not isinstance(num_folds, (int, np.integer)) or num_folds < 1:
        raise ValueError(f"num_folds must be a positive integer; got {num_folds!r}")
    if not 0 < far_target < 1:
        raise ValueError(f"far_target must lie in (0, 1); got {far_target!r}")
    emb, same = check_pairs(embeddings, issame)
    n_same = int(np.count_nonzero(same))
    if n_same == 0 or n_same == same.shape[0]:
        raise ValueError(f"issame must hold both same and different pairs; got {n_same} same of "
                         f"{same.shape[0]}")
    dist = pair_distances(emb, normalize=normalize)
    tpr, fpr, acc, fold_thr = calculate_roc(dist, same, ACC_THRESHOLDS, num_folds)
    val, val_std, far, val_thr = calculate_val(dist, same, far_target, VAL_THRESHOLDS, num_folds)
    order = np.argsort(fpr, kind="stable")
    auc = float(np.trapezoid(tpr[order], fpr[order]))
    return VerificationResult(
        num_pairs=int(same.shape[0]), num_same=n_same, num_folds=len(acc),
        accuracy=float(np.mean(acc)), accuracy_std=float(np.std(acc)),
        fold_accuracies=acc.tolist(), fold_thresholds=fold_thr.tolist(),
        best_threshold=_best_threshold(dist, same, ACC_THRESHOLDS),
        far_target=float(far_target), val=val, val_std=val_std, far=far,
        fold_val_thresholds=val_thr.tolist(), auc=auc,
        thresholds=ACC_THRESHOLDS.tolist(), tpr=tpr.tolist(), fpr=fpr.tolist())
