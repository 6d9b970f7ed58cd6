"""Synchronous SGD over workers, and who may speak for a worker.

A step of a table is applied once every live worker pushed it (or the missing ones were
dropped after ``--worker-timeout``); the pushes are averaged in worker-id order, so the
result does not depend on arrival order. Worker ids are ``0 .. --workers - 1``, all live
from the start. An id belongs to the connection (ZeroMQ routing id) that first registers
it or pushes for it (:class:`Workers`): another connection's push or register for it is
refused, until the owner's connection closes (or ZeroMQ's heartbeat finds it gone) or the
worker is dropped by the timeout. So a client can neither push as another worker nor add
phantom workers that every step would wait for.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .ops import Header, Request, RequestError, _expect
from .optim import NonFiniteUpdateError
from .table import MAX_STEP

__all__ = ["Workers", "SyncOps", "DEFERRED"]

log = logging.getLogger("paramserver")

DEFERRED = object()  # a handler's answer meaning "the reply is sent later"


@dataclass
class _Round:
    """The pending synchronous step of one table."""

    step: int
    started: float
    pushes: dict = field(default_factory=dict)    # worker -> (local rows, grads)
    waiters: list = field(default_factory=list)   # (Request, worker)


class Workers:
    """The ``count`` worker ids and the connection that owns each."""

    def __init__(self, count: int):
        self.count = count
        self.owner: dict[int, bytes] = {}

    def check(self, worker: int, peer: bytes, op: str) -> None:
        """Raise ``RequestError`` unless ``peer`` may act as ``worker``."""
        if not 0 <= worker < self.count:
            raise RequestError(f"{op}: worker {worker} is not one of this server's workers "
                               f"0..{self.count - 1} (--workers {self.count}); give each "
                               "process its rank, or restart the server with more --workers")
        owner = self.owner.get(worker)
        if owner is not None and owner != peer:
            raise RequestError(f"{op}: worker {worker} belongs to another connection (the one "
                               "that registered it or first pushed for it); a worker id is "
                               "free again once that connection closes or the worker is "
                               "dropped by --worker-timeout")

    def bind(self, worker: int, peer: bytes) -> None:
        if self.owner.get(worker) != peer:
            self.owner[worker] = peer
            log.info("worker %d bound to connection %s", worker, peer.hex())

    def release(self, worker: int) -> None:
        self.owner.pop(worker, None)

    def release_peer(self, peer: bytes) -> list[int]:
        """Free the ids ``peer`` owned (its connection closed); returns them."""
        gone = [w for w, p in self.owner.items() if p == peer]
        for w in gone:
            del self.owner[w]
        return gone


class SyncOps:
    """``register`` and ``push`` (a mixin: ``self`` is the :class:`ParamServer`)."""

    def op_register(self, header, arrays, req: Request):
        h = Header(header, {"worker"})
        _expect(arrays, [], "register")
        w = h.get("worker", "int", lo=0, hi=(1 << 31) - 1)
        self.workers.check(w, req.peer, "register")
        self.workers.bind(w, req.peer)
        if w not in self.live:
            self.live.add(w)
            log.info("worker %d registered; live workers %s", w, sorted(self.live))
        return {"workers": sorted(self.live)}, ()

    def op_push(self, header, arrays, req: Request):
        h = Header(header, {"table", "worker", "step"})
        t = self._table(h)
        _expect(arrays, [("rows", "int64", 1), ("grads", "float32", 2)], "push")
        worker = h.get("worker", "int", lo=0, hi=(1 << 31) - 1)
        step = h.get("step", "int", lo=1, hi=MAX_STEP)
        self.workers.check(worker, req.peer, "push")
        rows, grads = arrays
        local = self._local_rows(t, rows)
        t.check_grads(local, grads)  # finite, and repeated rows sum to finite values
        if step <= t.updates:
            raise RequestError(f"push of step {step} to table {t.name!r} is stale: the table "
                               f"is at step {t.updates} (a worker dropped after "
                               "--worker-timeout, or --workers lower than the number of "
                               f"workers?); its next step is {t.updates + 1}")
        if step > t.updates + 1:
            raise RequestError(f"push of step {step} to table {t.name!r} is ahead: the table "
                               f"is at step {t.updates}, its next step is {t.updates + 1}")
        rnd = self.rounds.get(t.name)
        if rnd is not None and worker in rnd.pushes:
            raise RequestError(f"worker {worker} already pushed step {step} of table "
                               f"{t.name!r}; each worker pushes once per step")
        # Everything is valid: from here on the push is accepted.
        self.workers.bind(worker, req.peer)
        if worker not in self.live:
            self.live.add(worker)
            log.info("worker %d joined at step %d of table %r; live workers %s", worker,
                     step, t.name, sorted(self.live))
        if rnd is None:
            rnd = self.rounds[t.name] = _Round(step, time.monotonic())
        rnd.pushes[worker] = (local, grads)
        rnd.waiters.append((req, worker))
        self._maybe_apply(t.name)
        return DEFERRED

    def _maybe_apply(self, name: str) -> None:
        rnd = self.rounds.get(name)
        if rnd is None or not self.live.issubset(rnd.pushes):
            return
        t = self.tables[name]
        workers = sorted(rnd.pushes)  # fixed order: the sum does not depend on arrival
        if len(workers) == 1:
            rows, grads = rnd.pushes[workers[0]]
        else:
            rows = np.concatenate([rnd.pushes[w][0] for w in workers])
            grads = np.concatenate([rnd.pushes[w][1] for w in workers])
            grads /= np.float32(len(workers))  # mean over workers
        try:
            t.apply_grad(rows, grads, check=False)  # each push was checked when accepted
        except NonFiniteUpdateError as exc:
            # The update itself leaves float32 (momentum or weights, or the workers' sum):
            # nothing was changed; every worker of the step is told and may push it again.
            del self.rounds[name]
            self.errors += 1
            log.warning("table %r step %d not applied (workers %s): %s", name, rnd.step,
                        workers, exc)
            for req, _w in rnd.waiters:
                self.send(req, {"ok": False, "error": (
                    f"step {rnd.step} of table {name!r} was not applied: {exc}. The table "
                    f"is still at step {t.updates}; push step {rnd.step} again")})
            return
        del self.rounds[name]
        log.debug("table %r step %d applied: workers %s, %d rows", name, rnd.step, workers,
                  rows.shape[0])
        for req, _w in rnd.waiters:
            self.send(req, {"ok": True, "step": rnd.step, "workers": workers})

    def _expire_workers(self) -> None:
        now = time.monotonic()
        dropped = False
        for name, rnd in list(self.rounds.items()):
            if now - rnd.started < self.worker_timeout:
                continue
            for w in sorted(self.live - set(rnd.pushes)):
                self.live.discard(w)
                self.workers.release(w)  # its connection, or a new one, may claim it again
                dropped = True
                log.warning("worker %d dropped: no push of step %d to table %r within "
                            "%.1f s (--worker-timeout); continuing with workers %s", w,
                            rnd.step, name, self.worker_timeout, sorted(self.live))
        if dropped:
            for name in list(self.rounds):
                self._maybe_apply(name)
