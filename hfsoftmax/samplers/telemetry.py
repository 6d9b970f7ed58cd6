"""Sampler telemetry: how many of the true hardest classes the selection contains."""
from __future__ import annotations

import numpy as np

from .index import normalize, to_numpy_features
from .selection import check_labels

__all__ = ["recall_of_true_topk"]


def recall_of_true_topk(features, rows, selected_ids, k: int = 10, *, metric: str = "ip",
                        labels=None, chunk_rows: int = 65536) -> float:
    """Fraction of each feature's true top-k classes that are in ``selected_ids``, averaged.

    The truth is the exact logits over all ``rows`` (inner product, or cosine with
    ``metric="cosine"``), computed in chunks. With ``labels`` given, each sample's own class
    is left out of its top-k (it is always selected), so the figure measures the hard
    negatives only. Meant to be called every K steps by the trainer (it costs one exact
    search over all rows).
    """
    import torch
    from .exact import chunked_topk
    x = to_numpy_features(features)
    w = np.ascontiguousarray(rows, dtype=np.float32)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"features (B, D) and rows (N, D) must agree on D, got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    if metric not in ("ip", "cosine"):
        raise ValueError(f"Unknown metric {metric!r}. Valid metrics: ip, cosine")
    if metric == "cosine":
        x, w = normalize(x), normalize(w)
    sel = selected_ids.detach().cpu().numpy() if isinstance(selected_ids, torch.Tensor) \
        else np.asarray(selected_ids)
    kk = k + 1 if labels is not None else k
    kk = min(kk, w.shape[0])
    with torch.no_grad():
        _, top = chunked_topk(torch.from_numpy(x), torch.from_numpy(w), kk, chunk_rows)
    top = top.numpy()
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        lab = check_labels(lab, w.shape[0])
        keep = top != lab[:, None]
        # drop the own label where present, else the last (k+1-th) entry
        drop_last = keep.all(axis=1)
        keep[drop_last, -1] = False
        top = top[keep].reshape(top.shape[0], kk - 1)
    hit = np.isin(top, sel)
    return float(hit.mean()) if hit.size else 1.0
