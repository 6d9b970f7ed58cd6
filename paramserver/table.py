"""A table of float32 rows with its momentum buffers: what a parameter server (or a shard of
one) holds, and what the trainer's in-process row store holds.

A table may hold a slice ``[row_start, row_start + num_rows)`` of a larger global table (a
shard). Initialisation depends only on the *global* row id and the seed, so a table split
over any number of shards starts with exactly the same rows as one unsplit table. All other
methods take *local* row ids ``0 .. num_rows-1``; mapping global ids to shards is the
client's job.
"""
from __future__ import annotations

import math
import re

import numpy as np

from .optim import NonFiniteUpdateError, SGDConfig, check_summed_grads, sgd_rows

__all__ = ["Table", "INITS", "init_rows", "TABLE_NAME", "MAX_STEP", "MAX_DIM", "check_name",
           "shard_bounds"]

INITS = ("zeros", "normal", "uniform")
# Table names: what the wire, the snapshot files and the logs accept (fullmatch: no "\n").
TABLE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
# Largest step counter (2**53 - 1: exact in a JSON number in every language); a push of
# step MAX_STEP is the last a table takes.
MAX_STEP = (1 << 53) - 1
MAX_DIM = 1 << 16


def check_name(name: object) -> str:
    """``name`` if it is a valid table name, else ``ValueError`` naming the rule."""
    if not isinstance(name, str) or TABLE_NAME.fullmatch(name) is None:
        text = repr(name)
        raise ValueError(f"table name {text[:60] + '...' if len(text) > 60 else text} must be "
                         "1-128 letters, digits, '_', '.' or '-'")
    return name
# Rows are initialised in blocks of this many global rows, each from its own seeded stream,
# so any shard can generate its rows without generating the rows before it.
_INIT_BLOCK = 4096


def shard_bounds(num_rows: int, count: int) -> list[tuple[int, int]]:
    """Each shard's global row range ``[a, b)`` when ``num_rows`` rows are split over
    ``count`` shards: shard ``i`` holds ``[i*N//count, (i+1)*N//count)``. The one split rule
    of the client over server shards, of :mod:`paramserver.reshard` and of the trainer's
    rows sharded over ranks (``--row-store dist``), so each reads the others' files."""
    return [(i * num_rows // count, (i + 1) * num_rows // count) for i in range(count)]


def init_rows(init: str, start: int, stop: int, dim: int, std: float, seed: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a table initialised with ``init`` (float32).

    ``normal``: N(0, std^2); ``uniform``: U(-std, std); ``zeros``: 0. Deterministic in
    (init, global row, dim, std, seed).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    out = np.zeros((stop - start, dim), dtype=np.float32)
    if init == "zeros" or stop <= start:
        return out
    first_block, last_block = start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK
    for block in range(first_block, last_block + 1):
        b0 = block * _INIT_BLOCK
        rng = np.random.default_rng([seed, block])
        if init == "normal":
            vals = rng.standard_normal((_INIT_BLOCK, dim), dtype=np.float32) * np.float32(std)
        else:
            vals = rng.uniform(-std, std, (_INIT_BLOCK, dim)).astype(np.float32)
        lo, hi = max(start, b0), min(stop, b0 + _INIT_BLOCK)
        out[lo - start:hi - start] = vals[lo - b0:hi - b0]
    return out


class Table:
    """Rows, momentum buffers and SGD settings of one table (or one shard of it)."""

    def __init__(self, name: str, num_rows: int, dim: int, *, init: str = "normal",
                 std: float = 0.01, seed: int = 0, row_start: int = 0,
                 optim: SGDConfig | None = None, weight: np.ndarray | None = None,
                 momentum: np.ndarray | None = None, global_rows: int | None = None):
        if num_rows < 0 or dim <= 0:
            raise ValueError(f"table {name!r}: need num_rows >= 0 and dim > 0, "
                             f"got num_rows={num_rows}, dim={dim}")
        self.name = name
        self.num_rows = int(num_rows)
        self.dim = int(dim)
        self.row_start = int(row_start)
        # Rows of the whole (unsharded) table; this table holds [row_start, row_start+num_rows).
        self.global_rows = int(global_rows) if global_rows is not None else row_start + num_rows
        if row_start < 0 or self.global_rows < row_start + num_rows:
            raise ValueError(f"table {name!r}: rows [{row_start}, {row_start + num_rows}) do "
                             f"not fit a global table of {self.global_rows} rows")
        self.init, self.std, self.seed = init, float(std), int(seed)
        # optim.catchup_decay: the stored rows lag their values by the weight decay of the
        # steps they were not pushed. _clock sums log(1 - lr * wd) over the steps applied
        # since the catch-up started; _mark[r] is the clock when row r was last brought up
        # to date; a row's value is weight[r] * exp(_clock - _mark[r]). None: no lag.
        self._clock = 0.0
        self._mark: np.ndarray | None = None
        self._optim = optim if optim is not None else SGDConfig()
        if weight is None:
            weight = init_rows(init, row_start, row_start + num_rows, dim, std, seed)
        if weight.shape != (num_rows, dim) or weight.dtype != np.float32:
            raise ValueError(f"table {name!r}: weight must be float32 {(num_rows, dim)}, "
                             f"got {weight.dtype} {weight.shape}")
        self.weight = weight
        self.momentum = momentum if momentum is not None else np.zeros_like(weight)
        if self.momentum.shape != weight.shape or self.momentum.dtype != np.float32:
            raise ValueError(f"table {name!r}: momentum must be float32 {(num_rows, dim)}, "
                             f"got {self.momentum.dtype} {self.momentum.shape}")
        self.updates = 0  # number of SGD steps applied to this table

    @property
    def nbytes(self) -> int:
        """Memory the table's arrays take (weights, momentum, catch-up marks)."""
        return self.weight.nbytes + self.momentum.nbytes + \
            (0 if self._mark is None else self._mark.nbytes)

    @property
    def optim(self) -> SGDConfig:
        """The SGD settings; setting them applies any decay still owed when the catch-up
        stops (so values never jump)."""
        return self._optim

    @optim.setter
    def optim(self, cfg: SGDConfig) -> None:
        if not cfg.catchup_decay:
            self.settle()
        self._optim = cfg

    def _lag(self, rows: np.ndarray | slice) -> np.ndarray | None:
        """The float32 factor per row between stored and current values, or None."""
        if self._mark is None:
            return None
        return np.exp(self._clock - self._mark[rows]).astype(np.float32)

    def _current(self, values: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        """``values`` (a copy of the stored ``rows``) with the decay they owe, in place."""
        lag = self._lag(rows)
        if lag is not None:
            values *= lag[:, None]
        return values

    def settle(self) -> None:
        """Write the owed weight decay into the stored rows (values unchanged: reads
        apply the same float32 product); the clock restarts. Before a snapshot, which
        stores values only."""
        if self._mark is None:
            return
        for start in range(0, self.num_rows, 65536):
            part = slice(start, min(start + 65536, self.num_rows))
            self.weight[part] *= self._lag(part)[:, None]
        self._mark, self._clock = None, 0.0

    def check_rows(self, rows: np.ndarray) -> None:
        """Raise ``IndexError`` naming the first local row id outside ``[0, num_rows)``."""
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = rows[(rows < 0) | (rows >= self.num_rows)][0]
            raise IndexError(f"table {self.name!r}: row {int(bad) + self.row_start} outside "
                             f"[{self.row_start}, {self.row_start + self.num_rows})")

    def check_values(self, rows: np.ndarray, values: np.ndarray, what: str = "grads") -> None:
        """Raise ``ValueError`` unless ``values`` is finite with shape ``(len(rows), dim)``."""
        if values.ndim != 2 or values.shape != (rows.shape[0], self.dim):
            raise ValueError(f"table {self.name!r}: {what} must have shape "
                             f"({rows.shape[0]}, {self.dim}) for {rows.shape[0]} rows, got "
                             f"{tuple(values.shape)}")
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
            raise ValueError(f"table {self.name!r}: {what} for row "
                             f"{int(rows[bad]) + self.row_start} are not finite "
                             "(NaN or inf); nothing was changed")

    def check_grads(self, rows: np.ndarray, grads: np.ndarray) -> None:
        """:meth:`check_values` for gradients, and also that the gradients of each repeated
        row id sum to finite float32 values (``NonFiniteUpdateError`` naming the row);
        what the server runs on each push as it arrives."""
        self.check_values(rows, grads, "grads")
        try:
            check_summed_grads(rows, grads, row_offset=self.row_start)
        except NonFiniteUpdateError as exc:
            raise NonFiniteUpdateError(f"table {self.name!r}: {exc}", exc.row) from None

    def pull(self, rows: np.ndarray) -> np.ndarray:
        """A float32 copy of the given (local) rows; duplicates allowed."""
        rows = np.asarray(rows, dtype=np.int64)
        self.check_rows(rows)
        return self._current(self.weight[rows], rows)

    def apply_grad(self, rows: np.ndarray, grads: np.ndarray, *, check: bool = True) -> None:
        """One SGD step with this table's settings; repeated rows accumulate.

        Validates rows, shape and finiteness first: a bad call changes nothing.
        ``check=False`` skips that, for callers that ran :meth:`check_rows` and
        :meth:`check_values` on these very arrays already (the server, per push). Either
        way a step whose summed gradients or results are not finite in float32 raises
        ``NonFiniteUpdateError`` (a ``ValueError``) naming the row and changes nothing
        (checked by :func:`paramserver.optim.sgd_rows`)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        grads = np.asarray(grads, dtype=np.float32)
        if check:
            self.check_rows(rows)
            self.check_values(rows, grads, "grads")
        cfg = self._optim
        if cfg.catchup_decay and self._mark is None:
            self._mark = np.full(self.num_rows, self._clock)
        try:
            sgd_rows(self.weight, self.momentum, rows, grads, cfg, row_offset=self.row_start,
                     row_scale=self._lag if cfg.catchup_decay else None)
        except NonFiniteUpdateError as exc:
            raise NonFiniteUpdateError(f"table {self.name!r}: {exc}", exc.row) from None
        if cfg.catchup_decay:  # this step's decay is in the pushed rows (sgd_rows' wd term)
            self._clock += math.log1p(-cfg.lr * cfg.weight_decay)
            self._mark[rows] = self._clock
        self.updates += 1

    def set_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Overwrite rows (their momentum buffers are left as they are); for a repeated row
        the last value wins."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float32)
        self.check_rows(rows)
        self.check_values(rows, values, "values")
        self.weight[rows] = values
        if self._mark is not None:
            self._mark[rows] = self._clock  # set values owe no decay

    def read(self, start: int, stop: int) -> np.ndarray:
        """Local rows ``[start, stop)`` as a float32 copy."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"table {self.name!r}: read range [{start}, {stop}) outside "
                             f"[0, {self.num_rows}]")
        # A reader on another thread (the trainer's index rebuild over a local store) may
        # take a row and its lag from different steps, one step's decay off: a cosine
        # index does not see it, as it may see a row mid-update anyway.
        return self._current(self.weight[start:stop].copy(), slice(start, stop))

    def checksum(self) -> str:
        """A hash of weights, momentum and settings, to tell whether anything changed."""
        import hashlib

        h = hashlib.sha256()
        h.update(self.weight.tobytes())
        h.update(self.momentum.tobytes())
        if self._mark is not None:
            h.update(self._mark.tobytes())
            h.update(repr(self._clock).encode())
        h.update(repr(sorted(self.optim.to_dict().items())).encode())
        return h.hexdigest()
