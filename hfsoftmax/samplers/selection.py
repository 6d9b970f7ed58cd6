"""The per-batch class-selection rule of HF-Softmax, on plain numpy arrays.

Zhang et al., "Accelerated Training for Massive Classification via Dynamic Class Selection"
(AAAI 2018), section 3: the softmax of a minibatch runs over the batch's own classes plus the
classes whose rows are nearest to the batch features (the hardest negatives). Here the
selected set is, in this order:

1. every unique label of the batch (sorted ascending);
2. the nearest classes of the features, interleaved by rank across the batch (everyone's
   1st neighbour, then everyone's 2nd, ...) so that no sample's 10th neighbour comes before
   another sample's 1st, de-duplicated, first occurrence kept;
3. uniformly random other classes (without replacement) up to exactly ``sample_num``.

``random_share`` (default 0, the paper's rule) reserves that fraction of the slots left after
the labels for step 3: the nearest classes fill only the rest. A mix keeps the hard
negatives and adds the broad, uniform ones that a full softmax sees (measured on the
synthetic benchmark: see ``benchmarks/accuracy.py``).

Everything is vectorized; the only loop is the (rare) redraw of the random top-up.

:func:`topup_log_weights` gives the log-Q correction of such a selection (off by default,
trainer ``--logq random``): the labels and neighbours are chosen outright, the random
top-up uniformly from all the other classes, so adding ``log(#others / #random)`` to the
random classes' logits makes the sampled softmax's normaliser an unbiased estimate of the
full softmax's (importance sampling; Bengio & Senecal 2008, Jean et al. 2015).
:func:`own_slots` and :func:`sample_log_weights` give the per-sample variant (trainer
``--logq sample``): for one sample only its label and *its own* nearest classes are
chosen outright; every other selected class (the batch's other labels, the other samples'
neighbours, the random top-up) is counted as a uniform draw from the classes left, so the
correction needs no random share and its estimate has the whole selection to draw on.
(:func:`sample_log_weights` alone builds with torch, on the device of the tensor it is given:
its (B, S) block is a training step's.)

>>> ids, remapped = select_classes(labels, neighbours, sample_num=1000, num_classes=10**6, rng=rng)
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["check_labels", "check_random_share", "interleave_neighbours", "neighbour_slots",
           "neighbours_per_sample", "own_slots", "random_topup", "sample_log_weights",
           "select_classes", "select_with_correction", "topup_log_weights"]


def check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array, raising ValueError on shape or range errors."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1D array of shape (batch_size,), got shape "
                         f"{tuple(labels.shape)}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"label {bad} is outside [0, num_classes={num_classes}); "
                             "check the dataset's class count and the sampler's num_classes")
    return labels


def interleave_neighbours(neighbours: np.ndarray, exclude_sorted: np.ndarray,
                          limit: int) -> np.ndarray:
    """Rank-interleaved, de-duplicated neighbour ids, at most ``limit`` of them.

    ``neighbours`` is (B, k) with best first per row; negative entries are padding (an ANN
    index may return fewer than k). Ids in ``exclude_sorted`` (sorted) are dropped.
    """
    if limit <= 0 or neighbours.size == 0:
        return np.empty(0, dtype=np.int64)
    flat = np.ascontiguousarray(neighbours.T).reshape(-1)  # rank-major: all 1st, all 2nd...
    flat = flat[flat >= 0]
    if exclude_sorted.size:
        pos = np.searchsorted(exclude_sorted, flat)
        pos[pos == exclude_sorted.size] = 0
        flat = flat[exclude_sorted[pos] != flat]
    if flat.size == 0:
        return np.empty(0, dtype=np.int64)
    _, first = np.unique(flat, return_index=True)
    first.sort()  # keep first occurrences in rank order
    return flat[first[:limit]].astype(np.int64, copy=False)


def random_topup(rng: np.random.Generator, num_classes: int, exclude: np.ndarray,
                 count: int) -> np.ndarray:
    """``count`` distinct ids drawn uniformly from [0, num_classes) minus ``exclude``.

    Sequential rejection of duplicates and excluded ids is the same distribution as drawing
    without replacement from the complement; when the complement is small (dense case) it is
    materialised and permuted instead, so the loop below always ends quickly.
    """
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    exclude = np.unique(np.asarray(exclude, dtype=np.int64))
    available = num_classes - exclude.size
    if count > available:
        raise ValueError(f"cannot draw {count} random classes: only {available} of "
                         f"{num_classes} classes are not selected yet")
    if num_classes <= 4 * (exclude.size + count) or num_classes <= 65536:
        mask = np.ones(num_classes, dtype=bool)
        mask[exclude] = False
        pool = np.flatnonzero(mask)
        return rng.choice(pool, size=count, replace=False).astype(np.int64, copy=False)
    taken = exclude
    out: list[np.ndarray] = []
    got = 0
    while got < count:  # sparse case: a handful of iterations at most
        draw = rng.integers(0, num_classes, size=int((count - got) * 1.1) + 16, dtype=np.int64)
        _, first = np.unique(draw, return_index=True)
        draw = draw[np.sort(first)]
        draw = draw[~np.isin(draw, taken, assume_unique=False)][:count - got]
        out.append(draw)
        got += draw.size
        taken = np.union1d(taken, draw)
    return np.concatenate(out)


def neighbour_slots(sample_num: int, num_labels: int, random_share: float = 0.0) -> int:
    """How many of ``sample_num`` slots the nearest classes may take: those left after the
    ``num_labels`` unique labels, less the ``random_share`` reserved for random classes."""
    free = max(0, int(sample_num) - int(num_labels))
    return free - int(round(float(random_share) * free))


def neighbours_per_sample(need: int, batch: int, oversample: float) -> int:
    """How many nearest classes each of ``batch`` samples asks for so that ``need``
    neighbour slots (:func:`neighbour_slots`) fill after de-duplication:
    ``ceil(need / batch * oversample) + 1``. One formula for every sampler's search."""
    return math.ceil(need / batch * oversample) + 1


def check_random_share(random_share) -> float:
    """``random_share`` as a float in [0, 1], or ValueError naming the value."""
    if isinstance(random_share, bool) or not isinstance(random_share, (int, float, np.floating)) \
            or not 0.0 <= float(random_share) <= 1.0:
        raise ValueError(f"random_share must be a number in [0, 1] (the share of the "
                         f"non-label slots kept for random classes), got {random_share!r}")
    return float(random_share)


def select_classes(labels: np.ndarray, neighbours: np.ndarray | None, sample_num: int,
                   num_classes: int, rng: np.random.Generator, random_share: float = 0.0):
    """Apply the selection rule; returns ``(class_ids (S,), remapped_labels (B,), n_neighbours)``.

    ``class_ids[remapped_labels] == labels`` always holds. With ``sample_num >= num_classes``
    all classes are selected as ``arange(num_classes)`` (so the sampled head equals the full
    head and the labels are unchanged). ``neighbours`` may be None (no index yet): labels plus
    random classes.
    """
    labels = check_labels(labels, num_classes)
    if isinstance(sample_num, bool) or not isinstance(sample_num, (int, np.integer)) \
            or sample_num <= 0:
        raise ValueError(f"sample_num must be a positive integer, got {sample_num!r}")
    sample_num = int(sample_num)
    if sample_num >= num_classes:
        return np.arange(num_classes, dtype=np.int64), labels.copy(), 0
    uniq = np.unique(labels)
    if sample_num < uniq.size:
        raise ValueError(f"sample_num={sample_num} is smaller than the {uniq.size} distinct "
                         "labels in this batch; raise sample_num or lower the batch size")
    need = sample_num - uniq.size
    if neighbours is not None:
        limit = neighbour_slots(sample_num, uniq.size, check_random_share(random_share))
        near = interleave_neighbours(np.asarray(neighbours, dtype=np.int64), uniq, limit)
        if near.size and (near.max() >= num_classes):
            raise ValueError(f"the index returned class id {int(near.max())} >= num_classes="
                             f"{num_classes}: it was built from a row table of another size")
    else:
        near = np.empty(0, dtype=np.int64)
    chosen = np.concatenate([uniq, near])
    rand = random_topup(rng, num_classes, chosen, need - near.size)
    class_ids = np.concatenate([chosen, rand])
    remapped = np.searchsorted(uniq, labels).astype(np.int64, copy=False)
    return class_ids, remapped, int(near.size)


def select_with_correction(labels: np.ndarray, neighbours: np.ndarray | None,
                           sample_num: int, num_classes: int, rng: np.random.Generator,
                           random_share: float, log_weights: bool | str):
    """:func:`select_classes` and the log-Q output ``log_weights`` asks for:
    ``(class_ids, remapped, num_neighbours, extra)``, ``extra`` None (``False``), the (S,)
    offsets of :func:`topup_log_weights` (``True``: labels and neighbours 0, the random
    top-up ``log(#others / #random)``, all zeros when every class is selected) or each
    sample's own slots (``"sample"``: :func:`own_slots`). The one end of every sampler's
    selection (index, device, sharded), so all select and correct alike."""
    ids, remapped, n_near = select_classes(labels, neighbours, sample_num, num_classes, rng,
                                           random_share)
    extra = None
    if log_weights == "sample":
        extra = own_slots(ids, remapped, neighbours)
    elif log_weights:
        extra = topup_log_weights(ids.size, num_classes, np.unique(labels).size + n_near)
    return ids, remapped, n_near, extra


def topup_log_weights(sample_num: int, num_classes: int, num_fixed: int) -> np.ndarray:
    """Per-slot logit offsets (``(sample_num,)`` float32) of the log-Q correction for a
    selection whose first ``num_fixed`` slots (labels, neighbours) were chosen outright and
    whose other ``r = sample_num - num_fixed`` slots were drawn uniformly without replacement
    from the ``num_classes - num_fixed`` classes left: 0 for the fixed slots,
    ``log((num_classes - num_fixed) / r)`` for the random ones (each stands for that many
    classes). Then ``sum_fixed exp(z) + sum_random exp(z + offset)`` has, over the draw, the
    full softmax's normaliser as its mean. All zeros when every class is selected.
    """
    sample_num, num_classes, num_fixed = int(sample_num), int(num_classes), int(num_fixed)
    if not 0 <= num_fixed <= sample_num:
        raise ValueError(f"num_fixed={num_fixed} must be in [0, sample_num={sample_num}]")
    out = np.zeros(sample_num, dtype=np.float32)
    rest, drawn = num_classes - num_fixed, sample_num - num_fixed
    if drawn > 0 and rest > drawn:
        out[num_fixed:] = np.log(rest / drawn)
    return out


def own_slots(class_ids: np.ndarray, remapped: np.ndarray,
              neighbours: np.ndarray | None) -> np.ndarray:
    """Each sample's own slots in a selection: ``(B, 1 + k)`` int64, the slot of its label
    (``remapped``) first, then the slots of its own nearest classes (its row of the index's
    answer ``neighbours``, (B, k), negative entries padding) that ``class_ids`` holds; -1
    where a neighbour was not selected (or is the label). ``neighbours=None``: label only."""
    class_ids = np.asarray(class_ids, dtype=np.int64)
    remapped = np.asarray(remapped, dtype=np.int64)
    if neighbours is None:
        return remapped[:, None].copy()
    nb = np.asarray(neighbours, dtype=np.int64)
    if nb.ndim != 2 or nb.shape[0] != remapped.shape[0]:
        raise ValueError(f"neighbours must have shape (batch_size, k) = ({remapped.shape[0]}, "
                         f"k), got {tuple(nb.shape)}")
    order = np.argsort(class_ids, kind="stable")
    sorted_ids = class_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, nb), sorted_ids.size - 1)
    slots = np.where((nb >= 0) & (sorted_ids[pos] == nb), order[pos], -1)
    slots[slots == remapped[:, None]] = -1
    return np.concatenate([remapped[:, None], slots], axis=1)


def sample_log_weights(own, sample_num: int, num_classes: int):
    """Per-sample logit offsets (``(B, sample_num)`` float32) of the per-sample log-Q
    correction, from :func:`own_slots`: 0 on a sample's own slots (``a_i`` distinct ones),
    ``log((num_classes - a_i) / (sample_num - a_i))`` on every other slot, which then stands
    for that many of the classes not chosen for this sample. All zeros when every class is
    selected. The other slots are not a uniform draw in the strict sense (other samples'
    neighbours lean toward classes near the batch), so the normaliser is nearly, not exactly,
    unbiased; in exchange the estimate rests on all ``sample_num - a_i`` other classes rather
    than on the random top-up alone.

    ``own`` a numpy array: a numpy array back; a torch tensor: a tensor on its device (the
    head passes the slots on the features' device, so a GPU builds the (B, S) block itself
    instead of copying it from the host). Built with torch either way (a fill and a scatter:
    0.25 ms at B=128, S=10,000 on one CPU thread, where a boolean mask in numpy took 3 ms).
    """
    import torch

    as_numpy = not isinstance(own, torch.Tensor)
    own = torch.as_tensor(np.asarray(own, dtype=np.int64)) if as_numpy else own.long()
    sample_num, num_classes = int(sample_num), int(num_classes)
    if own.ndim != 2 or own.numel() and (int(own.max()) >= sample_num
                                         or bool((own[:, 0] < 0).any())):
        raise ValueError(f"own must be (B, 1 + k) slots in [0, sample_num={sample_num}) with "
                         "the label's slot first (own_slots), got "
                         f"shape {tuple(own.shape)}")
    b = own.shape[0]
    srt = own.sort(dim=1).values                  # a_i: the distinct slots >= 0 of each row
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    a = ((srt >= 0) & first).sum(dim=1, dtype=torch.float64)
    rest, drawn = num_classes - a, sample_num - a
    ok = (drawn > 0) & (rest > drawn)
    w = torch.where(ok, torch.log(rest / drawn.clamp_min(1.0)), 0.0).float()
    out = w[:, None].expand(b, sample_num + 1).contiguous()
    out.scatter_(1, torch.where(own >= 0, own, sample_num), 0.0)  # -1: the spare last column
    out = out[:, :sample_num]
    return out.numpy() if as_numpy else out
