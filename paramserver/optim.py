"""SGD over rows of a table, with exactly ``torch.optim.SGD``'s arithmetic.

This is the one place the project's SGD math lives: the parameter-server process and the
trainer's in-process row store (``hfsoftmax``) both call :func:`sgd_rows`.

Semantics, per row, float32 throughout (as torch computes on float32 parameters)::

    d = grad + weight_decay * w
    buf = momentum * buf + d            # dampening is 0; a zero buffer makes step 1 buf = d
    d = d + momentum * buf  if nesterov else buf
    w = w - lr * d

Updates are *lazy*: a row that receives no gradient in a step is not touched (no weight
decay, no momentum decay). For the rows that are touched the result is what
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
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["SGDConfig", "reduce_duplicate_rows", "sgd_rows"]


@dataclass
class SGDConfig:
    """Optimizer settings of a table; ``lr`` may change mid-run (set it, then push)."""

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad setting, with torch.optim.SGD's rules."""
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"SGD {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"SGD {name} must be finite and >= 0, got {value!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"SGD nesterov must be true or false, got {self.nesterov!r}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("SGD nesterov=True needs momentum > 0 (as torch.optim.SGD); "
                             f"got momentum={self.momentum!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SGDConfig":
        unknown = set(d) - {"lr", "momentum", "weight_decay", "nesterov"}
        if unknown:
            raise ValueError(f"unknown SGD settings {sorted(unknown)}; valid: lr, momentum, "
                             "weight_decay, nesterov")
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


def sgd_rows(weight: np.ndarray, momentum_buf: np.ndarray | None, rows: np.ndarray,
             grads: np.ndarray, cfg: SGDConfig) -> None:
    """Apply one SGD step in place to ``weight[rows]`` (and ``momentum_buf[rows]``).

    ``rows`` may repeat (their gradients are summed first); ``grads`` is ``(len(rows), D)``.
    ``momentum_buf`` may be None only when ``cfg.momentum == 0``.
    """
    rows, grads = reduce_duplicate_rows(rows, np.asarray(grads, dtype=weight.dtype))
    if rows.size == 0:
        return
    if momentum_buf is None and cfg.momentum != 0:
        raise ValueError("momentum > 0 needs a momentum buffer")
    # In-place arithmetic on fresh copies (fancy indexing and reduce_duplicate_rows return
    # new arrays): the same float32 operations, in the same order, as the formulas above,
    # without a temporary per operation (this loop is the server's hot path).
    w = weight[rows]
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
        momentum_buf[rows] = buf
        if cfg.nesterov:
            np.multiply(buf, mom, out=tmp)
            d += tmp                               # d = d + mom * buf
        else:
            d = buf
    np.multiply(d, np.float32(cfg.lr), out=tmp)
    w -= tmp                                       # w = w - lr * d
    weight[rows] = w
