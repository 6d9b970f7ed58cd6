"""The sampled head's rows sharded over the ``torch.distributed`` ranks themselves
(trainer ``--row-store dist``).

The model-parallel classifier of Partial FC (An et al., "Partial FC: Training 10 Million
Identities on a Single Machine", ICCVW 2021) and of Megatron-LM's vocabulary-parallel
embedding (Shoeybi et al., 2019): with W ranks, rank ``r`` holds the contiguous rows
``[r * N // W, (r + 1) * N // W)`` (the split :class:`paramserver.ParamClient` makes over
server shards and :mod:`paramserver.reshard` writes), with their momentum, and trains only
those. No parameter server, no pushes to anyone: the head
(:class:`~hfsoftmax.heads.dist_sampled.DistSampledHead`) gives every rank the gradient of the
global batch's mean loss for its own selected rows, and the rank applies it.

**Where the rows live.** A shard is a :class:`paramserver.Table` on the host (rows, momentum,
the lazy catch-up decay), stepped by :func:`paramserver.optim.sgd_rows`: the SGD arithmetic
stays in the one place the server and :class:`~hfsoftmax.rowstore.LocalRowStore` use, and the
CPU needs nothing else. The features' device holds what the step reads: the selected rows
(pulled each step, ``S / W`` of them on average) and, for a selection by nearest classes, a
copy of the whole shard (:class:`~hfsoftmax.samplers.sharded.ShardSelector`), into which the
head writes each stepped row's new value. A table too large for the ranks' memory, or a run
without ``torch.distributed``, keeps the ZeroMQ server (``--ps``).

**Initial values** depend only on the global row id and the seed
(:func:`paramserver.table.init_rows`), so every W starts from the rows one process would.

**Snapshots** are a sharded server's files: rank ``r`` of W writes
``<path>.0000r-of-0000W`` (W = 1: ``<path>``), the ``paramserver.snapshot`` layout with its
shard index, so :class:`~hfsoftmax.rowstore.LocalRowStore` and a server read them as they
are and ``python -m paramserver.reshard <path> --shards W2`` rewrites them for another
number of ranks; :meth:`DistRowStore.restore` refuses another W naming that command.

>>> store = DistRowStore(num_rows, 256, SGDConfig(lr=0.1))     # this rank's shard
>>> store.start, store.stop                                    # its global row range
>>> store.push(ids_in_my_shard, grads)                         # one SGD step on them
"""
from __future__ import annotations

import logging
import os

import numpy as np

from . import distributed as hd
from .rowstore import SGDConfig, _as_grads
from paramserver.table import Table, shard_bounds

__all__ = ["DistRowStore", "GatheredRows", "shard_bounds"]

logger = logging.getLogger(__name__)


class DistRowStore:
    """This rank's shard of the classifier rows; see the module docstring.

    ``rank`` / ``world``: this process's place (default: the running process group, or 0 of
    1 without one). Row ids are global everywhere; a call naming a row of another rank's
    shard raises ``IndexError`` naming both ranges. ``version`` counts the times the rows
    were replaced wholesale (:meth:`restore`, :meth:`set_rows`), so a device copy knows to
    reload.
    """

    #: the rows are spread over the ranks: checkpoints write one file per rank
    sharded = True

    def __init__(self, num_rows: int, dim: int, optim: SGDConfig | None = None, *,
                 init: str = "normal", std: float = 0.01, seed: int = 0,
                 name: str = "classifier", rank: int | None = None, world: int | None = None):
        rank = hd.rank() if rank is None else int(rank)
        world = hd.world_size() if world is None else int(world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world} process(es)")
        if isinstance(num_rows, bool) or int(num_rows) < world:
            raise ValueError(f"{num_rows} classifier rows cannot be sharded over {world} "
                             "ranks (each needs at least one row); use fewer processes or "
                             "--row-store local")
        if optim is not None and not isinstance(optim, SGDConfig):
            raise ValueError(f"optim must be a paramserver.SGDConfig, got {type(optim).__name__}")
        self.rank, self.world = rank, world
        self.num_rows, self.dim, self.name = int(num_rows), int(dim), name
        self.start, self.stop = shard_bounds(self.num_rows, world)[rank]
        self.table = Table(name, self.stop - self.start, self.dim, init=init, std=std,
                           seed=seed, row_start=self.start, global_rows=self.num_rows,
                           optim=optim if optim is not None else SGDConfig())
        self.version = 0

    def __repr__(self):
        return (f"DistRowStore({self.name!r}, rows [{self.start}, {self.stop}) of "
                f"{self.num_rows} x {self.dim}, rank {self.rank} of {self.world})")

    @property
    def optim(self) -> SGDConfig:
        """The shard's SGD settings (the same on every rank)."""
        return self.table.optim

    # ------------------------------------------------------------------ this shard
    def local(self, rows) -> np.ndarray:
        """Global row ids (all in this shard) as local int64 ids; ``IndexError`` naming the
        first row that is not here and the rank that holds it."""
        rows = np.ascontiguousarray(np.asarray(rows).reshape(-1))
        if rows.dtype.kind not in "iu":
            raise ValueError(f"row ids must be integers, got dtype {rows.dtype}")
        rows = rows.astype(np.int64, copy=False)
        out = (rows < self.start) | (rows >= self.stop)
        if out.any():
            bad = int(rows[out][0])
            owner = next((i for i, (a, b) in enumerate(shard_bounds(self.num_rows, self.world))
                          if a <= bad < b), None)
            where = f"rank {owner}'s shard" if owner is not None else \
                f"outside [0, {self.num_rows})"
            raise IndexError(f"row {bad} is {where}; rank {self.rank} holds rows "
                             f"[{self.start}, {self.stop})")
        return rows - self.start

    def pull(self, rows) -> np.ndarray:
        """The current values of ``rows`` (global ids in this shard), float32."""
        return self.table.pull(self.local(rows))

    def push(self, rows, grads) -> np.ndarray:
        """One SGD step of this shard with ``grads`` for ``rows`` (global ids in this shard;
        none at all still counts the step: the catch-up decay's clock and the step count move
        on every rank alike). Returns the gradient applied."""
        local = self.local(rows)
        grads = _as_grads(grads, local.size, self.dim)
        self.table.apply_grad(local, grads)
        return grads

    def read_shard(self) -> np.ndarray:
        """This shard's current rows, float32 ``(stop - start, dim)`` (a copy)."""
        return self.table.read(0, self.table.num_rows)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (global ids), all in this shard."""
        if not self.start <= start <= stop <= self.stop:
            raise IndexError(f"read range [{start}, {stop}) is not inside this rank's rows "
                             f"[{self.start}, {self.stop}); gather_rows() collects all shards")
        return self.table.read(start - self.start, stop - self.start)

    def _whole(self, what: str) -> None:
        if self.world > 1:
            raise RuntimeError(f"{what}: rank {self.rank} holds only rows [{self.start}, "
                               f"{self.stop}) of {self.num_rows}; call gather_rows() on every "
                               "rank to collect them")

    def read_all(self, chunk_rows: int = 65536) -> np.ndarray:
        """All rows: only in a world of one (else ``RuntimeError`` naming gather_rows)."""
        self._whole("read_all")
        return self.read_shard()

    def iter_chunks(self, chunk_rows: int = 65536):
        """``(start, rows)`` chunks of the whole table: only in a world of one."""
        self._whole("iter_chunks")
        return GatheredRows(self.read_shard()).iter_chunks(chunk_rows)

    def reader(self, chunk_rows: int = 65536):
        """A function reading all rows: only in a world of one."""
        self._whole("reader")
        return self.read_shard

    def gather_rows(self, dst: int = 0, chunk_rows: int = 65536) -> "GatheredRows | None":
        """Every rank calls it: rank ``dst`` gets all rows (:class:`GatheredRows`, the whole
        table in its memory, once), the others None. For validation, not the step: each
        shard travels in ``chunk_rows`` broadcasts."""
        import torch

        if self.world == 1:
            return GatheredRows(self.read_shard())
        out = np.empty((self.num_rows, self.dim), np.float32) if self.rank == dst else None
        for owner, (a, b) in enumerate(shard_bounds(self.num_rows, self.world)):
            for c in range(a, b, chunk_rows):
                d = min(b, c + chunk_rows)
                mine = torch.from_numpy(self.read_range(c, d)) if owner == self.rank else None
                got = hd.broadcast(mine, owner, shape=(d - c, self.dim), dtype=torch.float32,
                                   device=torch.device("cpu"))
                if out is not None:
                    out[c:d] = got.numpy()
        return GatheredRows(out) if out is not None else None

    # ------------------------------------------------------------------ settings, values
    def set_lr(self, lr: float) -> None:
        """Set the shard's SGD learning rate (every rank alike: the trainer's schedule)."""
        self.table.optim = SGDConfig.from_dict({**self.table.optim.to_dict(), "lr": lr})

    def set_rows(self, rows, values) -> None:
        """Overwrite rows (momentum left as it is). Every rank is given the same rows (the
        trainer's ``--init-rows``): each keeps those of its shard and skips the others."""
        rows = np.asarray(rows).reshape(-1).astype(np.int64)
        values = _as_grads(values, rows.size, self.dim)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row ids must lie in [0, {self.num_rows})")
        mine = (rows >= self.start) & (rows < self.stop)
        if mine.any():
            self.table.set_rows(rows[mine] - self.start, values[mine])
            self.version += 1

    def info(self) -> dict:
        """This shard's sizes, step and optimizer."""
        t = self.table
        return {"num_rows": self.num_rows, "dim": self.dim, "row_start": self.start,
                "row_stop": self.stop, "rank": self.rank, "world": self.world,
                "step": t.updates, "optim": t.optim.to_dict()}

    # ------------------------------------------------------------------ snapshots
    def shard_path(self, path: str | os.PathLike) -> str:
        """This rank's file of snapshot ``path``."""
        from paramserver.reshard import shard_file_names

        return shard_file_names(path, self.world)[self.rank]

    def snapshot(self, path: str | os.PathLike) -> None:
        """Write this rank's shard to :meth:`shard_path` (every rank calls it)."""
        from paramserver.snapshot import write_snapshot

        f = self.shard_path(path)
        write_snapshot(f, {self.name: self.table}, {"shard_index": str(self.rank),
                                                    "shard_count": str(self.world)})
        logger.info("rows [%d, %d) of %r written to %s", self.start, self.stop, self.name, f)

    def restore(self, path: str | os.PathLike) -> None:
        """Load this rank's shard of snapshot ``path`` (every rank calls it). A snapshot of
        another number of shards (another W, or one file of a local run) is refused naming
        ``python -m paramserver.reshard``; the ranks' shards must be of one step."""
        import torch
        from paramserver.snapcheck import SnapshotError

        path = os.fspath(path)
        t, error = None, None
        try:  # every rank reaches the collective below, failed or not (no rank left waiting)
            t = self._read_shard(path)
        except (ValueError, SnapshotError, OSError) as e:
            error = e
        ok = 0 if error is not None else 1
        mine = torch.tensor([ok, t.updates if t is not None else -1], dtype=torch.int64)
        every = hd.all_gather_tensor(mine[None], [1] * self.world).tolist()
        if error is not None:
            raise error
        failed = [r for r, (good, _) in enumerate(every) if not good]
        if failed:
            raise ValueError(f"row snapshot {path}: rank(s) {failed} could not read their "
                             "shard (their log says why)")
        steps = [u for _, u in every]
        if len(set(steps)) > 1:
            raise ValueError(f"row snapshot {path}: the ranks' shards are of different steps "
                             f"{steps}; they were not written together")
        self.table = t
        self.version += 1
        logger.info("rows [%d, %d) of %r restored from %s (%d updates)", self.start,
                    self.stop, self.name, self.shard_path(path), t.updates)

    def _read_shard(self, path: str):
        """This rank's table of snapshot ``path``, checked against this rank's rows
        (``ValueError`` naming the file and the fix)."""
        from paramserver.reshard import find_snapshot_files
        from paramserver.snapcheck import SnapshotError, open_snapshot

        try:
            files = find_snapshot_files(path, self.world)
        except SnapshotError as e:
            try:
                other = len(find_snapshot_files(path))
            except SnapshotError:
                raise ValueError(str(e)) from None
            raise ValueError(f"row snapshot {path} was written by {other} shard(s) and this "
                             f"run has {self.world} rank(s); rewrite it for {self.world} "
                             f"first: python -m paramserver.reshard {path} --shards "
                             f"{self.world}") from None
        with open_snapshot(files[self.rank]) as snap:
            if (snap.shard_index, snap.shard_count) != (self.rank, self.world):
                raise ValueError(f"{files[self.rank]} says it is shard {snap.shard_index} of "
                                 f"{snap.shard_count}, not {self.rank} of {self.world}")
            t = snap.load([self.name])[self.name]
        want = (self.start, self.stop - self.start, self.num_rows, self.dim)
        got = (t.row_start, t.num_rows, t.global_rows, t.dim)
        if got != want:
            raise ValueError(f"{files[self.rank]}: table {self.name!r} holds rows "
                             f"[{t.row_start}, {t.row_start + t.num_rows}) of {t.global_rows} "
                             f"x {t.dim}; rank {self.rank} needs [{self.start}, {self.stop}) "
                             f"of {self.num_rows} x {self.dim}")
        return t

    def delete_snapshot(self, path: str | os.PathLike) -> None:
        """Remove this rank's file of snapshot ``path``."""
        os.unlink(self.shard_path(path))

    def close(self) -> None:
        """Nothing to release (the rows go with the process)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GatheredRows:
    """All rows in memory (what :meth:`DistRowStore.gather_rows` gives rank ``dst``), read
    as a row store's chunks: what the held-out top-1 reads."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.num_rows, self.dim = rows.shape

    def iter_chunks(self, chunk_rows: int = 65536):
        """``(start, rows)`` chunks of ``chunk_rows`` rows, in order."""
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
        for start in range(0, self.num_rows, chunk_rows):
            yield start, self.rows[start:start + chunk_rows]

    def read_all(self, chunk_rows: int = 65536) -> np.ndarray:
        """All rows (the array itself, not a copy)."""
        return self.rows
