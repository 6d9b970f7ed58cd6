"""Row stores: where the classifier rows W (num_classes x dim) live for the sampled head.

One small interface, two implementations, so the sampled head never knows which it has:

- :class:`LocalRowStore`: the rows in this process, in a :class:`paramserver.Table`, trained
  by the same numpy SGD (:func:`paramserver.optim.sgd_rows`) the server uses. For small runs
  and tests. Under ``torch.distributed`` (world size > 1) every rank holds a copy; a push
  averages the ranks' gradients (all-reduce) before the update, so the copies stay equal and
  the result equals the parameter server's average over workers.
- :class:`RemoteRowStore`: the rows in a parameter-server process (or shards of them), over
  :class:`paramserver.ParamClient`. The trainer holds only the rows it pulled.

>>> store = LocalRowStore(100_000, 256, SGDConfig(lr=0.1, momentum=0.9, weight_decay=5e-4))
>>> w = store.pull(np.array([3, 7]))          # (2, 256) float32
>>> store.push(np.array([3, 7]), grad)        # one SGD step on those rows

Snapshots: both stores write the parameter server's snapshot file
(:mod:`paramserver.snapshot`: safetensors layout, ``<table>/weight`` and
``<table>/momentum``, written atomically), so a local run's snapshot restores into a server
and back. The remote store asks the server to write it (the path is on the server's host;
one file per shard, see ``ParamClient.shard_paths``).
"""
from __future__ import annotations

import abc
import functools
import logging
import os
from typing import Iterator

import numpy as np

from paramserver.optim import SGDConfig
from paramserver.table import Table

__all__ = ["RowStore", "LocalRowStore", "RemoteRowStore", "SGDConfig", "ParamRowSource",
           "build_row_store"]

logger = logging.getLogger(__name__)



def _as_rows(rows, num_rows: int) -> np.ndarray:
    rows = np.ascontiguousarray(np.asarray(rows).reshape(-1))
    if rows.dtype.kind not in "iu":
        raise ValueError(f"row ids must be integers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64, copy=False)
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        bad = rows[(rows < 0) | (rows >= num_rows)][0]
        raise IndexError(f"row id {int(bad)} outside [0, {num_rows})")
    return rows


def _as_grads(grads, n: int, dim: int) -> np.ndarray:
    grads = np.ascontiguousarray(np.asarray(grads, dtype=np.float32))
    if grads.shape != (n, dim):
        raise ValueError(f"gradients must have shape ({n}, {dim}) (one row per id), got "
                         f"{grads.shape}")
    if not np.isfinite(grads).all():
        raise FloatingPointError("row gradients contain NaN or inf; refusing to push them")
    return grads


class RowStore(abc.ABC):
    """The classifier rows: pull some, push their gradients (one SGD step), read them all."""

    num_rows: int
    dim: int

    @abc.abstractmethod
    def pull(self, rows: np.ndarray) -> np.ndarray:
        """The current values of ``rows`` (int64 ids), float32 ``(len(rows), dim)``."""

    @abc.abstractmethod
    def push(self, rows: np.ndarray, grads: np.ndarray) -> np.ndarray | None:
        """One synchronous SGD step on ``rows`` with gradients ``grads`` (n, dim).

        Returns the gradient the step applied where this process knows it (the local
        store: the ranks' mean), or None where another process averages the workers'
        gradients (the parameter server): a caller that needs the applied gradient then
        averages it itself."""

    @abc.abstractmethod
    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32 (a copy)."""

    @abc.abstractmethod
    def set_lr(self, lr: float) -> None:
        """Change the learning rate of the rows' SGD (the trainer's schedule)."""

    @abc.abstractmethod
    def snapshot(self, path: str | os.PathLike) -> None:
        """Write the rows, momentum and optimizer settings to ``path``."""

    @abc.abstractmethod
    def restore(self, path: str | os.PathLike) -> None:
        """Load what :meth:`snapshot` wrote (this store's table only)."""

    @abc.abstractmethod
    def delete_snapshot(self, path: str | os.PathLike) -> None:
        """Remove a snapshot :meth:`snapshot` wrote (pruning old ones)."""

    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, rows[start:start+chunk_rows])`` over the whole table, so that a
        reader (an index build, a recall probe) never needs all of W at once."""
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
        for start in range(0, self.num_rows, chunk_rows):
            yield start, self.read_range(start, min(start + chunk_rows, self.num_rows))

    def reader(self, chunk_rows: int = 65536):
        """A callable returning all rows (read in chunks), safe to call on another thread
        while this store serves the training thread: what a background index rebuild calls."""
        return functools.partial(self.read_all, chunk_rows)

    def read_all(self, chunk_rows: int = 65536) -> np.ndarray:
        """All rows, float32 ``(num_rows, dim)``, read in chunks of ``chunk_rows``."""
        out = np.empty((self.num_rows, self.dim), dtype=np.float32)
        for start, block in self.iter_chunks(chunk_rows):
            out[start:start + len(block)] = block
        return out

    def close(self) -> None:
        """Release connections (no-op for the local store)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dist_mean(grads: np.ndarray) -> np.ndarray:
    """Average a gradient over torch.distributed ranks (identity in a world of one)."""
    from . import distributed as hd

    if not hd.is_dist():
        return grads
    import torch

    return hd.all_reduce_mean(torch.from_numpy(grads)).numpy()


class LocalRowStore(RowStore):
    """Rows in this process: a :class:`paramserver.Table` and its numpy SGD."""

    def __init__(self, num_rows: int, dim: int, optim: SGDConfig | None = None, *,
                 init: str = "normal", std: float = 0.01, seed: int = 0,
                 name: str = "classifier"):
        if optim is not None and not isinstance(optim, SGDConfig):
            raise ValueError(f"optim must be a paramserver.SGDConfig, got {type(optim).__name__}")
        self.table = Table(name, int(num_rows), int(dim), init=init, std=std, seed=seed,
                           optim=optim if optim is not None else SGDConfig())
        self.name = name
        self.num_rows, self.dim = self.table.num_rows, self.table.dim

    @property
    def optim(self) -> SGDConfig:
        return self.table.optim

    def pull(self, rows: np.ndarray) -> np.ndarray:
        return self.table.pull(_as_rows(rows, self.num_rows))

    def push(self, rows: np.ndarray, grads: np.ndarray) -> np.ndarray:
        rows = _as_rows(rows, self.num_rows)
        grads = _dist_mean(_as_grads(grads, rows.size, self.dim))
        self.table.apply_grad(rows, grads)
        return grads

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self.table.read(start, stop)

    def set_lr(self, lr: float) -> None:
        cfg = SGDConfig.from_dict({**self.table.optim.to_dict(), "lr": lr})
        self.table.optim = cfg

    def set_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Overwrite rows (e.g. to start from given weights); momentum is left as it is."""
        rows = _as_rows(rows, self.num_rows)
        self.table.set_rows(rows, _as_grads(values, rows.size, self.dim))

    def snapshot(self, path: str | os.PathLike) -> None:
        from paramserver.snapshot import write_snapshot

        write_snapshot(path, {self.table.name: self.table})
        logger.info("row store %r snapshot written to %s", self.table.name, path)

    def restore(self, path: str | os.PathLike) -> None:
        """Load this store's table from ``path``: one snapshot file, or the shard files
        ``path.IIIII-of-SSSSS`` of a sharded server (joined: :mod:`paramserver.reshard`);
        every file checked in full."""
        from paramserver.reshard import find_snapshot_files, load_tables
        from paramserver.snapshot import open_snapshot

        t = self.table
        with open_snapshot(find_snapshot_files(path)[0]) as snap:  # its header only
            if t.name not in snap.tables:
                raise ValueError(f"snapshot {path} has no table {t.name!r}; it holds "
                                 f"{sorted(snap.tables)}")
        new = load_tables(path, [t.name])[t.name]
        if (new.num_rows, new.dim) != (t.num_rows, t.dim):
            raise ValueError(f"snapshot {path}: table {t.name!r} is {new.num_rows} x "
                             f"{new.dim}, this store is {t.num_rows} x {t.dim}")
        self.table = new
        logger.info("row store %r restored from %s (%d updates)", t.name, path, new.updates)

    def delete_snapshot(self, path: str | os.PathLike) -> None:
        os.unlink(path)


class ParamRowSource:
    """Where another process can read the rows by itself: server address(es), table, CURVE
    keys. JSON-able (``to_dict`` / ``from_dict``), so an index process
    (:class:`hfsoftmax.samplers.ProcessSampler`) gets it over a pipe and reads the table
    with its own :class:`paramserver.ParamClient`: the trainer never holds all rows.
    ``curve_server_key`` / ``curve_secret_key``: as for ``ParamClient`` (key files or Z85
    strings readable by the reading process)."""

    kind = "paramserver"

    def __init__(self, addresses, table: str, *, timeout_s: float = 30.0,
                 chunk_rows: int = 65536, curve_server_key: str | None = None,
                 curve_secret_key: str | None = None):
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        self.table = str(table)
        self.timeout_s = float(timeout_s)
        if int(chunk_rows) <= 0:
            raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)
        self.curve_server_key, self.curve_secret_key = curve_server_key, curve_secret_key

    def to_dict(self) -> dict:
        return {"kind": self.kind, "addresses": self.addresses, "table": self.table,
                "timeout_s": self.timeout_s, "chunk_rows": self.chunk_rows,
                "curve_server_key": self.curve_server_key,
                "curve_secret_key": self.curve_secret_key}

    @classmethod
    def from_dict(cls, d: dict) -> "ParamRowSource":
        d = {k: v for k, v in d.items() if k != "kind"}
        return cls(d.pop("addresses"), d.pop("table"), **d)

    def read(self) -> np.ndarray:
        """All rows, read in chunks over a new connection (closed afterwards)."""
        from paramserver import ParamClient

        client = ParamClient(self.addresses, timeout_s=self.timeout_s,
                             curve_server_key=self.curve_server_key,
                             curve_secret_key=self.curve_secret_key)
        try:
            return client.read_all(self.table, chunk_rows=self.chunk_rows)
        finally:
            client.close()

    def __repr__(self):
        return f"ParamRowSource({self.addresses!r}, {self.table!r})"


class _RemoteReader:
    """``RemoteRowStore.reader()``: a callable reading all rows over its own connection,
    that also says where the rows are (``row_source``) for readers in other processes."""

    def __init__(self, store: "RemoteRowStore", chunk_rows: int):
        self.store, self.chunk_rows = store, chunk_rows

    @property
    def row_source(self) -> ParamRowSource:
        return self.store.row_source(self.chunk_rows)

    def __call__(self) -> np.ndarray:
        client = self.store._new_client()
        try:
            return client.read_all(self.store.name, chunk_rows=self.chunk_rows)
        finally:
            client.close()


class RemoteRowStore(RowStore):
    """Rows in a parameter server, through a :class:`paramserver.ParamClient`.

    With ``num_rows``/``dim`` given, the table is created (idempotently: an existing table of
    the same shape is kept) and, with ``optim`` given, its optimizer set; without them the
    table must exist and its shape is read from the server. ``own_client``: close the
    client with the store. ``client_factory``: makes another client like ``client`` (needed
    only with CURVE keys) for reads on the rebuild thread. ``curve_server_key`` /
    ``curve_secret_key``: the CURVE keys (files) an index process uses to read the rows by
    itself (:meth:`row_source`); needed only with CURVE and a process sampler.
    """

    def __init__(self, client, table: str = "classifier", num_rows: int | None = None,
                 dim: int | None = None, optim: SGDConfig | None = None, *,
                 init: str = "normal", std: float = 0.01, seed: int = 0,
                 own_client: bool = False, client_factory=None,
                 curve_server_key: str | None = None, curve_secret_key: str | None = None):
        self.client = client
        self.client_factory = client_factory
        self.curve_server_key, self.curve_secret_key = curve_server_key, curve_secret_key
        self.name = table
        self.own_client = own_client
        if (num_rows is None) != (dim is None):
            raise ValueError("give both num_rows and dim (to create the table) or neither "
                             f"(to use an existing one), got num_rows={num_rows}, dim={dim}")
        if num_rows is not None:
            client.create_table(table, int(num_rows), int(dim), init=init, std=std, seed=seed)
        if optim is not None:
            client.set_optimizer(table, **optim.to_dict())
        info = client.table_info(table)
        self.num_rows, self.dim = int(info["num_rows"]), int(info["dim"])
        if num_rows is not None and (self.num_rows, self.dim) != (int(num_rows), int(dim)):
            raise ValueError(f"server table {table!r} is {self.num_rows} x {self.dim}, asked "
                             f"for {num_rows} x {dim}; use another table name")

    def pull(self, rows: np.ndarray) -> np.ndarray:
        return self.client.pull(self.name, _as_rows(rows, self.num_rows))

    def push(self, rows: np.ndarray, grads: np.ndarray) -> None:
        rows = _as_rows(rows, self.num_rows)
        # the server averages the workers' pushes: the applied gradient is not known here
        self.client.push(self.name, rows, _as_grads(grads, rows.size, self.dim))

    def read_range(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"read range [{start}, {stop}) outside [0, {self.num_rows}]")
        return self.client.pull(self.name, np.arange(start, stop, dtype=np.int64))

    def read_all(self, chunk_rows: int = 65536) -> np.ndarray:
        return self.client.read_all(self.name, chunk_rows=chunk_rows)

    def _new_client(self):
        if self.client_factory is not None:
            return self.client_factory()
        from paramserver import ParamClient

        c = self.client
        return ParamClient(c.addresses, worker_id=c.worker_id, timeout_s=c.timeout_s)

    def reader(self, chunk_rows: int = 65536):
        """A callable reading all rows over its *own* connection (a ZeroMQ socket must not
        be shared between threads), for the sampler's background rebuild. With CURVE, give
        the store a ``client_factory`` that makes clients with the keys. Its ``row_source``
        attribute (:meth:`row_source`) lets a process sampler's index process read the
        rows itself instead."""
        return _RemoteReader(self, chunk_rows)

    def row_source(self, chunk_rows: int = 65536) -> ParamRowSource:
        """Where another process reads these rows by itself (addresses, table, CURVE keys)."""
        c = self.client
        uses_curve = any(getattr(conn, "curve", None) for conn in getattr(c, "_conns", []))
        if uses_curve and self.curve_server_key is None:
            raise ValueError("this row store's client uses CURVE: give RemoteRowStore "
                             "curve_server_key= and curve_secret_key= (key files) so that an "
                             "index process can connect to the server by itself")
        return ParamRowSource(c.addresses, self.name, timeout_s=c.timeout_s,
                              chunk_rows=chunk_rows, curve_server_key=self.curve_server_key,
                              curve_secret_key=self.curve_secret_key)

    def set_lr(self, lr: float) -> None:
        self.client.set_lr(self.name, lr)

    def set_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Overwrite rows on the server (momentum is left as it is)."""
        rows = _as_rows(rows, self.num_rows)
        self.client.set_rows(self.name, rows, _as_grads(values, rows.size, self.dim))

    def info(self) -> dict:
        """The server's description of the table (sizes, step, optimizer)."""
        return self.client.table_info(self.name)

    def snapshot(self, path: str | os.PathLike) -> None:
        """Have the server(s) write this store's table to ``path``, relative to their
        snapshot folder."""
        self.client.snapshot(os.fspath(path), tables=[self.name])

    def restore(self, path: str | os.PathLike) -> None:
        """Restore this store's table (only) from ``path`` in the servers' snapshot folder.
        A snapshot written by another number of shards is rewritten for this one first
        with ``python -m paramserver.reshard`` (the message says so)."""
        from paramserver import ParamServerError

        try:
            self.client.restore(os.fspath(path), tables=[self.name])
        except ParamServerError as e:
            if "No such file" not in str(e) and "not found" not in str(e):
                raise
            n = len(self.client.addresses)
            raise ParamServerError(e.address, e.op, f"{e.server_message}. If the snapshot was "
                                   f"written by another number of shards, rewrite it for {n}: "
                                   f"python -m paramserver.reshard <snapshot folder>/"
                                   f"{os.fspath(path)} --shards {n}") from None

    def delete_snapshot(self, path: str | os.PathLike) -> None:
        """Delete the snapshot ``path`` (each shard's file) in the servers' snapshot folder."""
        self.client.delete_snapshot(os.fspath(path))

    def close(self) -> None:
        if self.own_client:
            self.client.close()


def build_row_store(num_rows: int, dim: int, sgd: SGDConfig, *, ps: list[str] | None = None,
                    table: str = "classifier", timeout_s: float = 120.0, seed: int = 0,
                    rank: int = 0, world: int = 1) -> RowStore:
    """The sampled head's rows: in this process (``ps`` None), or in table ``table`` of the
    parameter server(s) at ``ps`` (created if missing, its optimizer set to ``sgd``, this
    process registered as worker ``rank`` of ``world``). Errors name the server command
    that would fix them."""
    if not ps:
        return LocalRowStore(num_rows, dim, sgd, seed=seed)
    from paramserver import ParamClient

    client = ParamClient(ps, worker_id=rank, timeout_s=timeout_s)
    try:
        status = client.ping()
    except Exception as e:
        client.close()
        raise RuntimeError(f"no parameter server answers at {','.join(ps)}: {e}. Start "
                           "one with `python paramserver/paramserver.py --bind "
                           f"{ps[0]} --workers {world}`") from None
    expected = set(status[0].get("workers", []) or [])
    if expected and max(expected) >= world:
        client.close()
        raise RuntimeError(f"the parameter server waits for workers {sorted(expected)} but "
                           f"this run has {world} process(es); restart it with --workers "
                           f"{world}")
    store = RemoteRowStore(client, table, num_rows, dim, sgd, seed=seed, own_client=True)
    client.register()  # every step now waits for this rank's push
    return store
