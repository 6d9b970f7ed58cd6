"""IJB-B / IJB-C 1:1 verification (template to template), without torch.

The protocol of InsightFace's IJB evaluation (``recognition/arcface_torch/eval_ijbc.py``),
re-implemented with every step vectorised:

1. **Image features** (:func:`image_features`), by InsightFace's test modes: ``flip`` (F):
   the embedding of the image plus that of its mirror image; ``norm`` (N): keep each
   feature's norm (N1, the default) or L2-normalise it first (N0); ``detector`` (D): scale
   each feature by its face detector's score (D1, the default) or not (D0).
2. **Media pooling, then template pooling** (:func:`template_features`): within a template,
   the features of the images of one media (the frames of one video, or one photo) are
   averaged; the template's feature is the *sum* of its media's averages, L2-normalised. So a
   video with many frames counts as much as one photo. (A template whose features sum to
   zero, e.g. every detector score 0, keeps a zero feature and scores 0 with anything.)
3. **Scores** (:func:`pair_scores`): the cosine of the two templates' features per pair.
4. **ROC and TPR@FPR** (:func:`roc`, :func:`tpr_at_fpr`): one ROC point per distinct score
   (accept ``score >= threshold``) plus the start (0, 0); for each target FPR (1e-6 .. 1e-1)
   the point whose FPR is closest to the target, and among points at that FPR the one with
   the highest TPR (InsightFace's rule: its table searches the reversed curve). Where
   InsightFace's script differs: it uses scikit-learn's ``roc_curve``, whose
   ``drop_intermediate`` removes points inside straight stretches of the curve, so when the
   target falls inside a flat stretch it can jump to a neighbouring step; here every point
   is kept. With IJB-C's 15.6M impostor pairs one step is 6.4e-8 in FPR.

>>> feats = image_features(emb, emb_flip, scores)                 # (N, D)
>>> tids, tfeats = template_features(feats, templates, medias)
>>> result = evaluate_ijb(feats, templates, medias, t1, t2, labels)
>>> result.tpr_at_fpr                                              # {1e-06: ..., 0.1: ...}
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["TARGET_FPRS", "image_features", "template_features", "pair_scores", "roc",
           "tpr_at_fpr", "IJBResult", "evaluate_ijb", "read_template_media", "read_pairs",
           "read_landmarks", "format_ijb_table"]

TARGET_FPRS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_PAIR_CHUNK = 100_000  # pairs scored at a time (bounds the gathered feature blocks)
_CURVE_POINTS = 400    # ROC points kept in the JSON report (log-spaced in FPR)


def image_features(emb: np.ndarray, emb_flip: np.ndarray | None = None,
                   detector_scores: np.ndarray | None = None, *, flip: bool = True,
                   norm: bool = True, detector: bool = True) -> np.ndarray:
    """Per-image features (N, D) float64 by InsightFace's test modes (module docstring).
    ``emb_flip`` is needed for ``flip``, ``detector_scores`` (N,) for ``detector``."""
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be (N, D) with N > 0, got shape {x.shape}")
    if flip:
        if emb_flip is None or np.shape(emb_flip) != x.shape:
            raise ValueError(f"flip mode needs the mirror images' embeddings of shape "
                             f"{x.shape}, got {None if emb_flip is None else np.shape(emb_flip)}")
        x = x + np.asarray(emb_flip, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("embeddings hold NaN or inf")
    if not norm:
        n = np.linalg.norm(x, axis=1, keepdims=True)
        if (n == 0).any():
            raise ValueError(f"{int((n == 0).sum())} zero embedding(s) cannot be normalised")
        x = x / n
    if detector:
        s = np.asarray(detector_scores, dtype=np.float64).reshape(-1) \
            if detector_scores is not None else None
        if s is None or s.shape[0] != x.shape[0] or not np.isfinite(s).all():
            raise ValueError("detector mode needs one finite detector score per image")
        x = x * s[:, None]
    return x


def _group_sums(x: np.ndarray, group: np.ndarray, ngroups: int) -> np.ndarray:
    """Row sums of ``x`` per group id in [0, ngroups) (sorted, then np.add.reduceat)."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    out = np.zeros((ngroups, x.shape[1]))
    out[g[starts]] = np.add.reduceat(x[order], starts, axis=0)
    return out


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids sorted, features (T, D))``: media averages summed per template, then
    L2-normalised (step 2 of the module docstring)."""
    feats = np.asarray(feats, dtype=np.float64)
    templates = np.asarray(templates).reshape(-1)
    medias = np.asarray(medias).reshape(-1)
    if not (feats.ndim == 2 and templates.shape[0] == medias.shape[0] == feats.shape[0]):
        raise ValueError(f"features {feats.shape}, templates {templates.shape} and medias "
                         f"{medias.shape} must describe the same images")
    tids, t_idx = np.unique(templates, return_inverse=True)
    pairs = np.stack([t_idx, np.asarray(medias, dtype=np.int64)], axis=1)
    groups, g_idx = np.unique(pairs, axis=0, return_inverse=True)
    g_idx = g_idx.reshape(-1)
    counts = np.bincount(g_idx, minlength=len(groups)).astype(np.float64)
    media_mean = _group_sums(feats, g_idx, len(groups)) / counts[:, None]
    tf = _group_sums(media_mean, groups[:, 0], len(tids))
    n = np.linalg.norm(tf, axis=1, keepdims=True)
    return tids, np.divide(tf, n, out=np.zeros_like(tf), where=n > 0)


def pair_scores(tids: np.ndarray, tfeats: np.ndarray, t1: np.ndarray, t2: np.ndarray
                ) -> np.ndarray:
    """Cosine score of each pair (dot product of the normalised template features)."""
    t1, t2 = np.asarray(t1).reshape(-1), np.asarray(t2).reshape(-1)
    idx = []
    for t in (t1, t2):
        i = np.searchsorted(tids, t).clip(0, len(tids) - 1)
        missing = tids[i] != t
        if missing.any():
            raise ValueError(f"{int(missing.sum())} pair(s) name templates without images "
                             f"(first: template {t[missing][0]}); the pair list and the "
                             "template/media list do not belong together")
        idx.append(i)
    out = np.empty(t1.shape[0])
    for s in range(0, t1.shape[0], _PAIR_CHUNK):
        a, b = idx[0][s:s + _PAIR_CHUNK], idx[1][s:s + _PAIR_CHUNK]
        out[s:s + _PAIR_CHUNK] = np.einsum("ij,ij->i", tfeats[a], tfeats[b])
    return out


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: the start (0, 0) at threshold +inf, then one point per
    distinct score in decreasing order (accepting ``score >= threshold``)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    npos, nneg = int(labels.sum()), int((~labels).sum())
    if npos == 0 or nneg == 0:
        raise ValueError(f"need genuine and impostor pairs, got {npos} and {nneg}")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or inf")
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last pair of each run of equal scores
    tp, fp = np.cumsum(lab)[last], np.cumsum(~lab)[last]
    return (np.r_[0.0, fp / nneg], np.r_[0.0, tp / npos], np.r_[np.inf, s[last]])


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, targets=TARGET_FPRS) -> list[float]:
    """TPR at the ROC point closest in FPR to each target (ties: the higher FPR, then the
    highest TPR at it), for ``fpr`` non-decreasing as :func:`roc` gives it."""
    out = []
    for x in targets:
        j = int(np.searchsorted(fpr, x, side="left"))  # fpr[j-1] < x <= fpr[j]
        if j >= len(fpr) or (j > 0 and x - fpr[j - 1] < fpr[j] - x):
            k = j - 1                                   # the run at fpr[j-1] ends at j-1
        else:
            k = int(np.searchsorted(fpr, fpr[j], side="right")) - 1
        out.append(float(tpr[k]))
    return out


@dataclass
class IJBResult:
    """One IJB evaluation: ``tpr_at_fpr`` ({target: TPR}), counts, AUC, the modes and a
    log-spaced sample of the ROC (``fpr``/``tpr``) for plots."""

    num_templates: int
    num_pairs: int
    num_genuine: int
    auc: float
    targets: list[float]
    tprs: list[float]
    modes: dict = field(default_factory=dict)
    fpr: list[float] = field(default_factory=list, repr=False)
    tpr: list[float] = field(default_factory=list, repr=False)

    @property
    def tpr_at_fpr(self) -> dict[float, float]:
        return dict(zip(self.targets, self.tprs))

    def to_dict(self) -> dict:
        return {**asdict(self), "table": {f"{t:g}": v for t, v in zip(self.targets, self.tprs)}}


def _curve_sample(fpr: np.ndarray, tpr: np.ndarray) -> tuple[list, list]:
    grid = np.unique(np.r_[0.0, np.logspace(-8, 0, _CURVE_POINTS)])
    k = np.searchsorted(fpr, grid, side="right") - 1  # the highest TPR at FPR <= grid
    return fpr[k].tolist(), tpr[k].tolist()


def evaluate_ijb(feats: np.ndarray, templates, medias, t1, t2, labels,
                 targets=TARGET_FPRS, modes: dict | None = None) -> tuple[IJBResult, np.ndarray]:
    """``(result, pair scores)`` of per-image ``feats`` (already by the test modes of
    :func:`image_features`), pooled and scored as the module docstring says."""
    tids, tfeats = template_features(feats, templates, medias)
    scores = pair_scores(tids, tfeats, t1, t2)
    fpr, tpr, _ = roc(scores, labels)
    auc = float(np.trapezoid(tpr, fpr))
    sf, st = _curve_sample(fpr, tpr)
    lab = np.asarray(labels).astype(bool)
    return IJBResult(num_templates=len(tids), num_pairs=int(lab.shape[0]),
                     num_genuine=int(lab.sum()), auc=auc, targets=list(targets),
                     tprs=tpr_at_fpr(fpr, tpr, targets), modes=dict(modes or {}),
                     fpr=sf, tpr=st), scores


# ---------------------------------------------------------------------------- meta files
def _lines(path: str | os.PathLike):
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"IJB meta file not found: {path}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line.split()


def read_template_media(path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``*_face_tid_mid.txt``: ``image_name template_id media_id`` lines ->
    ``(names, templates, medias)``."""
    names, tm = [], []
    for lineno, parts in _lines(path):
        try:
            if len(parts) != 3:
                raise ValueError
            tm.append((int(parts[1]), int(parts[2])))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected 'image_name template_id media_id', "
                             f"got {' '.join(parts)[:80]!r}") from None
        names.append(parts[0])
    if not names:
        raise ValueError(f"{path}: no images listed")
    a = np.asarray(tm, dtype=np.int64)
    return names, a[:, 0], a[:, 1]


def read_pairs(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``*_template_pair_label.txt``: ``template1 template2 label`` lines (label 1: same
    identity) -> three int64 arrays."""
    try:
        a = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except FileNotFoundError:
        raise FileNotFoundError(f"IJB meta file not found: {path}") from None
    except ValueError as e:
        raise ValueError(f"{path}: expected 'template1 template2 label' integer lines ({e})"
                         ) from None
    if a.shape[0] == 0 or a.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 integer columns, got shape {a.shape}")
    if not np.isin(a[:, 2], (0, 1)).all():
        raise ValueError(f"{path}: labels must be 0 or 1")
    return a[:, 0], a[:, 1], a[:, 2]


def read_landmarks(path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``*_name_5pts_score.txt``: ``image_name x1 y1 ... x5 y5 score`` lines ->
    ``(names, landmarks (N, 5, 2) float32, detector scores (N,) float32)``."""
    names, vals = [], []
    for lineno, parts in _lines(path):
        try:
            if len(parts) != 12:
                raise ValueError
            v = [float(x) for x in parts[1:]]
            if not all(math.isfinite(x) for x in v):
                raise ValueError
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected 'image_name' then 10 landmark "
                             f"coordinates and a detector score, got {' '.join(parts)[:80]!r}"
                             ) from None
        names.append(parts[0])
        vals.append(v)
    if not names:
        raise ValueError(f"{path}: no images listed")
    a = np.asarray(vals, dtype=np.float32)
    return names, a[:, :10].reshape(-1, 5, 2), a[:, 10]


def format_ijb_table(results: dict[str, IJBResult]) -> str:
    """TPR (%) at each target FPR, one row per result (InsightFace's table)."""
    targets = next(iter(results.values())).targets if results else list(TARGET_FPRS)
    header = ["name", *(f"{t:g}" for t in targets), "AUC"]
    rows = [header] + [[n, *(f"{100 * v:.2f}" for v in r.tprs), f"{100 * r.auc:.2f}"]
                       for n, r in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
