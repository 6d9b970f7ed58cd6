"""SGD over rows of a table, with exactly ``torch.optim.SGD``'s arithmetic.

This is the one place the project's SGD math lives: the parameter-server process and the
trainer's in-process row store (``hfsoftmax``) both call :func:`sgd_rows`.

Semantics, per row, float32 throughout (as torch computes on float32 parameters)::

    d = grad + weight_decay * w
    buf = momentum * buf + d            # dampening is 0; a zero buffer makes step 1 buf = d
    d = d + momentum * buf  if nesterov else buf
    w = w - lr * d
    w = renorm * w / |w|    if renorm > 0   # not torch's: an option for the margin heads
    w = max_norm * w / |w|  if 0 < max_norm < |w|  # a cap, as nn.Embedding's max_norm

A step never writes NaN or inf: when the summed gradient of a row, or the updated weight or
momentum of a row, is not finite in float32 (finite gradients of a repeated row id can add up
past float32's range, about 3.4e38), :func:`sgd_rows` raises :class:`NonFiniteUpdateError`
naming the row and changes nothing. Both the server and the in-process row store rely on this
check, which lives only here.

Updates are *lazy*: a row that receives no gradient in a step is not touched (no weight
decay, no momentum decay), unless ``catchup_decay`` (kept by :class:`paramserver.Table`:
a pushed row first gets the weight decay of the steps it missed, as a dense SGD without
momentum would have applied). For the rows that are touched the result is what
``torch.optim.SGD`` gives on a parameter made of those rows; for a dense push of every row
it is ``torch.optim.SGD`` on the whole matrix. Equal to float32 round-off, not always bit for
bit: torch's CPU kernels may fuse ``a + alpha * b`` into one multiply-add (tests allow a
max relative error of 1e-5 after 20 steps).

>>> cfg = SGDConfig(lr=0.1, momentum=0.9)
>>> w = np.zeros((4, 2), np.float32); buf = np.zeros_like(w)
>>> sgd_rows(w, buf, np.array([1, 1, 3]), np.ones((3, 2), np.float32), cfg)
>>> w[1].tolist(), w[3].tolist()
([-0.20000000298023224, -0.20000000298023224], [-0.10000000149011612, -0.10000000149011612])
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np

__all__ = ["SGDConfig", "NonFiniteUpdateError", "reduce_duplicate_rows",
           "check_summed_grads", "sgd_rows"]

_SCALE_FIX = ("scale the gradients down (check the loss for a blow-up: a too high learning "
              "rate or loss scale)")


class NonFiniteUpdateError(ValueError, FloatingPointError):
    """An SGD step that would write NaN or inf into a table; nothing was changed.

    A ``ValueError`` (the server answers it as a refused request) and a
    ``FloatingPointError`` (like the row store's other non-finite errors). ``row`` is the
    first offending row id, numbered as in the message.
    """

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row


@dataclass
class SGDConfig:
    """Optimizer settings of a table; ``lr`` may change mid-run (set it, then push)."""

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    #: > 0: after the step, rescale each updated row to this L2 norm (0: off). For the
    #: margin heads, whose logits ignore a row's norm: sparse, lumpy updates (sampled
    #: heads) inflate norms, and a row's effective step on its direction is lr / |w|^2.
    renorm: float = 0.0
    #: > 0: after the step, scale each updated row whose L2 norm exceeds this down to it
    #: (0: off); rows below it keep their norm, as ``nn.Embedding(max_norm=...)``. A cap
    #: where ``renorm`` is a setpoint: with ``catchup_decay`` rows may settle below it.
    #: Exclusive with ``renorm``.
    max_norm: float = 0.0
    #: True: weight decay as a dense SGD applies it, to every row every step, kept lazily:
    #: :class:`paramserver.Table` counts the decay of the steps a row was not pushed, applies
    #: it when the row is next pushed and shows it in every read. Exact for momentum 0 (the
    #: only setting it takes): a row with no gradient then only decays, by ``1 - lr * wd``.
    #: Lazy weight decay acts on a sampled row 1 step in ~N/S, too seldom to balance the
    #: norm growth of its gradients; this keeps the full softmax's balance.
    catchup_decay: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad setting, with torch.optim.SGD's rules."""
        for name in ("lr", "momentum", "weight_decay", "renorm", "max_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"SGD {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"SGD {name} must be finite and >= 0, got {value!r}")
        for name in ("nesterov", "catchup_decay"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SGD {name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.renorm > 0 and self.max_norm > 0:
            raise ValueError(f"SGD renorm={self.renorm!r} (every updated row set to that norm) "
                             f"and max_norm={self.max_norm!r} (rows capped at that norm) "
                             "exclude each other: set one of them to 0")
        if self.catchup_decay and self.momentum != 0:
            raise ValueError("SGD catchup_decay=True needs momentum 0 (the skipped steps' "
                             "decay of a lazy momentum buffer is not kept); got "
                             f"momentum={self.momentum!r}: set momentum 0 (the trainer's "
                             "--row-momentum 0) or catchup_decay off")
        if self.catchup_decay and self.lr * self.weight_decay >= 1:
            raise ValueError(f"SGD catchup_decay=True needs lr * weight_decay < 1 (each "
                             f"step scales a row by 1 - lr * weight_decay); got lr={self.lr!r}, "
                             f"weight_decay={self.weight_decay!r}: lower either")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("SGD nesterov=True needs momentum > 0 (as torch.optim.SGD); "
                             f"got momentum={self.momentum!r}")

    def to_dict(self) -> dict:
        """The settings as a flat dict: what snapshots store and the wire carries."""
        return asdict(self)

    @classmethod
    def field_kinds(cls) -> dict[str, str]:
        """Each setting's name and kind (``"bool"`` or ``"float"``), from the dataclass's
        fields: the one list of SGD settings (the server's ``set_optimizer``, the client and
        the snapshot reader all read it from here)."""
        return {f.name: "bool" if f.type in (bool, "bool") else "float" for f in fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> "SGDConfig":
        unknown = set(d) - set(cls.field_kinds())
        if unknown:
            raise ValueError(f"unknown SGD settings {sorted(unknown)}; valid: "
                             f"{', '.join(cls.field_kinds())}")
        return cls(**d)


def reduce_duplicate_rows(rows: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the gradients of repeated row ids, as autograd would for a gather.

    Returns ``(unique_rows, summed_grads)`` with ``unique_rows`` sorted ascending.
    Vectorized, no Python loop over rows: one stable argsort, then either ``np.add.at`` of
    the few repeated entries onto the first occurrences (the usual case: sampled rows
    rarely repeat; ``np.add.reduceat`` over many short segments is ~10x slower there), or
    ``np.add.reduceat`` when most entries are repeats.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size == 0:
        return rows, grads.reshape(0, grads.shape[-1] if grads.ndim == 2 else 0)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    first = np.r_[True, sorted_rows[1:] != sorted_rows[:-1]]
    starts = np.flatnonzero(first)
    if starts.size == rows.size:  # no duplicates: only reorder
        return sorted_rows, grads[order]
    ordered = grads[order]
    if 4 * starts.size >= rows.size:  # mostly unique: add the repeats onto the firsts
        summed = ordered[starts]
        extra = np.flatnonzero(~first)
        np.add.at(summed, np.cumsum(first)[extra] - 1, ordered[extra])
    else:
        summed = np.add.reduceat(ordered, starts, axis=0)
    return sorted_rows[starts], summed.astype(grads.dtype, copy=False)


def _first_nonfinite_row(values: np.ndarray) -> int | None:
    """Index of the first row of the 2-D ``values`` holding NaN or inf, or None."""
    finite = np.isfinite(values)
    if finite.all():
        return None
    return int(np.flatnonzero(~finite.all(axis=1))[0])


def _check_sums(in_rows: np.ndarray, rows: np.ndarray, summed: np.ndarray,
                row_offset: int) -> None:
    """Raise :class:`NonFiniteUpdateError` for the first row of ``summed`` (the reduced
    gradients of the ids ``in_rows``) that is not finite."""
    bad = _first_nonfinite_row(summed)
    if bad is None:
        return
    row = int(rows[bad])
    count = int(np.count_nonzero(in_rows == row))
    what = (f"the {count} gradients of row {row + row_offset} sum past the float32 range "
            "(about 3.4e38) or hold NaN/inf" if count > 1 else
            f"the gradient of row {row + row_offset} holds NaN or inf")
    raise NonFiniteUpdateError(f"{what}; nothing was changed: {_SCALE_FIX}", row + row_offset)


def check_summed_grads(rows: np.ndarray, grads: np.ndarray, *, row_offset: int = 0) -> None:
    """Raise :class:`NonFiniteUpdateError` if the gradients of a repeated row id sum to NaN
    or inf in float32 (as :func:`sgd_rows` would sum them); the message names the row
    (``rows + row_offset``).

    For callers that accept gradients before applying them (the server checks each push
    when it arrives, so a bad push is refused alone). Only the repeated ids are summed, so
    a push without repeats costs one sort of ``rows``. Single entries are not checked here:
    check them for NaN/inf first (``Table.check_values``).
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size < 2:
        return
    order = np.argsort(rows, kind="stable")
    same = rows[order][1:] == rows[order][:-1]
    if not same.any():
        return
    repeated = np.zeros(rows.size, dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    pick = np.sort(order[repeated])  # the entries of repeated ids, in their original order
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below
        sub_rows, summed = reduce_duplicate_rows(rows[pick], np.asarray(grads)[pick])
    _check_sums(rows[pick], sub_rows, summed, row_offset)


def sgd_rows(weight: np.ndarray, momentum_buf: np.ndarray | None, rows: np.ndarray,
             grads: np.ndarray, cfg: SGDConfig, *, row_offset: int = 0,
             row_scale: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Apply one SGD step in place to ``weight[rows]`` (and ``momentum_buf[rows]``).

    ``rows`` may repeat (their gradients are summed first); ``grads`` is ``(len(rows), D)``.
    ``momentum_buf`` may be None only when ``cfg.momentum == 0``. ``row_scale``, given the
    sorted unique rows, returns a float32 factor per row that multiplies each stored row
    before the step (the table's caught-up weight decay); it changes nothing if the step
    is refused.

    Raises :class:`NonFiniteUpdateError`, changing nothing, when a summed gradient or an
    updated weight or momentum row is not finite; ``row_offset`` is added to the row ids in
    its message (a shard's first global row).
    """
    # Overflows (float32 sums or updates past ~3.4e38) are detected and reported below,
    # before anything is written: numpy's warnings about them would only be noise.
    with np.errstate(over="ignore", invalid="ignore"):
        _sgd_rows_checked(weight, momentum_buf, rows, grads, cfg, row_offset, row_scale)


def _sgd_rows_checked(weight, momentum_buf, in_rows, grads, cfg, row_offset,
                      row_scale=None) -> None:
    """:func:`sgd_rows`'s body: reduce, update copies, check them, write back."""
    in_rows = np.asarray(in_rows, dtype=np.int64).reshape(-1)
    grads_in = np.asarray(grads, dtype=weight.dtype)  # never written (the sums are copies)
    rows, grads = reduce_duplicate_rows(in_rows, grads_in)
    if rows.size == 0:
        return
    if momentum_buf is None and cfg.momentum != 0:
        raise ValueError("momentum > 0 needs a momentum buffer")
    # In-place arithmetic on fresh copies (fancy indexing and reduce_duplicate_rows return
    # new arrays): the same float32 operations, in the same order, as the formulas above,
    # without a temporary per operation (this loop is the server's hot path). Nothing is
    # written back before both results are known to be finite.
    w = weight[rows]
    if row_scale is not None:
        w *= np.asarray(row_scale(rows), dtype=w.dtype)[:, None]
    buf = None
    d = grads if grads.base is None and grads.flags.writeable else grads.copy()
    tmp = np.empty_like(d)
    if cfg.weight_decay != 0:
        np.multiply(w, np.float32(cfg.weight_decay), out=tmp)
        d += tmp                                   # d = grad + wd * w
    if cfg.momentum != 0:
        mom = np.float32(cfg.momentum)
        buf = momentum_buf[rows]
        buf *= mom
        buf += d                                   # buf = mom * buf + d
        if cfg.nesterov:
            np.multiply(buf, mom, out=tmp)
            d += tmp                               # d = d + mom * buf
        else:
            d = buf
    np.multiply(d, np.float32(cfg.lr), out=tmp)
    w -= tmp                                       # w = w - lr * d
    if cfg.renorm > 0 or cfg.max_norm > 0:         # w = target * w / |w| (zero rows stay)
        norms = np.sqrt(np.einsum("ij,ij->i", w, w))[:, None]
        target = np.float32(cfg.renorm or cfg.max_norm)
        scale = norms > (target if cfg.max_norm > 0 else 0)  # a cap scales only rows above
        np.divide(target, norms, out=norms, where=scale)
        w *= np.where(scale, norms, np.float32(1))
    # One check covers everything: a non-finite summed gradient or momentum row makes the
    # new w non-finite too (inf + x, lr * inf, and 0 * inf = NaN for lr = 0), so w finite
    # means d and buf were. Which one it was is told apart only on the error path, which
    # keeps the hot path at a single pass over w.
    bad = _first_nonfinite_row(w)
    if bad is not None:
        _check_sums(in_rows, *reduce_duplicate_rows(in_rows, grads_in), row_offset)
        row = int(rows[bad]) + row_offset
        raise NonFiniteUpdateError(
            f"the SGD update of row {row} leaves the float32 range (its new weight or "
            f"momentum would be inf/NaN with lr={cfg.lr}, momentum={cfg.momentum}, "
            f"weight_decay={cfg.weight_decay}); nothing was changed: {_SCALE_FIX}", row)
    if buf is not None:
        momentum_buf[rows] = buf
    weight[rows] = w
