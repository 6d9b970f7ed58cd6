"""The HF-Softmax sampled head: softmax over a dynamically selected subset of the classes.

Zhang, Yang, Yan, Lin, "Accelerated Training for Massive Classification via Dynamic Class
Selection", AAAI 2018 (arXiv 1801.01687). The classifier rows W live in a row store
(:mod:`hfsoftmax.rowstore`: in-process, or a parameter server), never as an ``nn.Parameter``
of the trainer. Per training step:

1. ``ids, target = sampler.select(features, labels, sample_num)``: the batch's labels, the
   classes nearest to the features in the sampler's index (hard negatives), random classes
   up to exactly ``sample_num``; ``target`` = the labels remapped into ``ids``;
2. ``W_S = rowstore.pull(ids)``: one request; a leaf tensor on the features' device;
3. logits over ``W_S`` only (linear, CosFace or ArcFace, the same code as the full head:
   :class:`~hfsoftmax.heads.logits.LogitSpec`), cross-entropy;
4. inside ``loss.backward()`` a hook on ``W_S`` pushes ``grad W_S`` to the row store, which
   applies one SGD step to those rows (the ids are unique, so no reduction is needed);
5. with a sampler built with ``fresh_rows``, the pushed rows' new values (estimated as
   ``W_S - lr * grad``) go to ``sampler.note_rows``: it searches them exactly beside its
   index until the next rebuild, so the selection does not go stale between rebuilds;
6. every ``interval`` steps (``sampler.maybe_rebuild``) the sampler's index is rebuilt from
   all rows on a background thread; training keeps querying the old index meanwhile. The
   rows are read in chunks through ``rowstore.reader()`` (its own connection for a remote
   store): the trainer holds all of W only transiently, while the index is built. With a
   process sampler (``build_sampler(..., process=True)``) the index lives in its own
   process, which reads the rows itself (the remote store's reader carries a
   ``row_source``): the trainer then holds neither W nor the index.

With ``sample_num == num_classes`` it gives exactly the full head's loss and gradients.

**On a GPU** the step waits on the host once: the features (and, already copied beside
them, the labels) go to the host for the selection (an index on the host); the pulled rows,
ids and targets go to the device from pinned memory without blocking, and the hook copies
the row gradient into pinned memory without waiting. With a
:class:`~hfsoftmax.heads.push.ThreadedRowStore` the push itself runs on the store's thread
while the backbone's backward runs (the trainer's ``--split-backward``); the next forward
waits for its acknowledgement before it selects, so the result is the same as pushing in
the hook. The trainer also turns off :attr:`SampledHead.check_finite` (a host read of the
loss every step): it checks the loss on the device, and the row store refuses non-finite
gradients.

**log-Q correction** (``logq=True``, trainer ``--logq random``; off by default). A
softmax over a selection leaves the unselected classes out of its normaliser, so a sample's
loss, and its feature's pull toward its own row, fade sooner than under the full softmax.
With the correction the random top-up's logits (never a label's or a neighbour's) get
``log(#classes not chosen outright / #random drawn)`` added in the loss, so the random
classes stand for all those left out and the normaliser is unbiased (``selection.
topup_log_weights``). The logits the head returns (accuracy, logs) stay uncorrected. It acts
only where the selection has random classes: ``--random-share`` > 0, the ``random`` sampler,
or steps before the first index. ``logq="sample"`` (trainer ``--logq sample``, its
default for a margin head selecting by index) corrects per sample instead: only a sample's
label and its own nearest classes count as chosen for it, every other selected class gets
``log(#classes not chosen for it / #other selected)`` (``selection.sample_log_weights``); it
needs no random share, as the batch's other labels and the other samples' neighbours are
(nearly) uniform draws from a sample's point of view.

**Distributed (torch.distributed, world size W > 1).** Every rank all-gathers the features
(detached) and labels of all ranks; rank 0 runs the selection over the *global* batch and
broadcasts the class ids and the remapped global labels; every rank then pulls the same rows,
computes the logits of *its own* samples over them, and pushes its gradient of its own mean
loss as parameter-server worker ``rank``. The server (or :class:`~hfsoftmax.rowstore.
LocalRowStore`, by an all-reduce) averages the W pushes, so the row update is the gradient of
the mean loss over the global batch: W ranks at batch B equal one process at batch W*B
exactly (the backbone's gradients, averaged by DDP, agree as well). Only rank 0 holds an
index; the other ranks never rebuild.

>>> store = RemoteRowStore(ParamClient("tcp://127.0.0.1:5570"), "classifier", N, 256, sgd)
>>> head = SampledHead(store, build_sampler("annoy", N, 256), sample_num=1000,
...                    logit="cosface", s=30.0, m=0.2, interval=100)
>>> out = head(features, labels); out.loss.backward()   # rows updated in the row store
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as hd
from ..samplers.selection import sample_log_weights
from .base import HeadOutput, RowStoreHeadMixin, check_batch, register_head
from .logits import DEFAULT_SCALE, LogitSpec
from .push import host_array as _host_array, host_copy, host_inputs as _host_inputs, \
    to_device as _to_device

__all__ = ["SampledHead", "exact_topk"]

logger = logging.getLogger(__name__)


def exact_topk(features: torch.Tensor, rowstore, k: int, cosine: bool,
               chunk_rows: int = 65536) -> torch.Tensor:
    """The true top-``k`` classes of each feature over *all* rows, read in chunks (CPU).

    The reference for the selection-recall telemetry: memory stays at one chunk of rows.
    """
    q = features.detach().float().cpu()
    if cosine:
        q = F.normalize(q, dim=1)
    best_v = torch.full((q.shape[0], 0), -float("inf"))
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    for start, block in rowstore.iter_chunks(chunk_rows):
        w = torch.from_numpy(block)
        if cosine:
            w = F.normalize(w, dim=1)
        scores = q @ w.T
        kk = min(k, scores.shape[1])
        v, i = scores.topk(kk, dim=1)
        best_v = torch.cat([best_v, v], 1)
        best_i = torch.cat([best_i, i + start], 1)
        if best_v.shape[1] > k:
            best_v, pos = best_v.topk(k, dim=1)
            best_i = best_i.gather(1, pos)
    return best_i


@register_head("sampled")
class SampledHead(RowStoreHeadMixin, nn.Module):
    """Softmax over ``sample_num`` selected rows of a row store (see the module docstring).

    ``interval``: rebuild the sampler's index every this many training steps (None: the
    sampler's own ``interval``; the first training step builds the first index, and until it
    is ready the selection is labels + random classes). ``recall_every`` (0: off) logs,
    every this many steps, the fraction of each sample's true top-``recall_k`` classes
    (exact scores over all rows, read in chunks) that the selection contains. :meth:`stats`
    gives the latest figures. The head has no parameters: the trainer's LR schedule reaches
    the rows through :meth:`set_lr`.
    """

    def __init__(self, rowstore, sampler, sample_num: int, logit: str = "linear",
                 s: float = DEFAULT_SCALE, m: float | None = None, interval: int | None = None,
                 easy_margin: bool = False, recall_every: int = 0, recall_k: int = 10,
                 chunk_rows: int = 65536, logq: bool | str = False):
        super().__init__()
        if isinstance(sample_num, bool) or not isinstance(sample_num, (int, np.integer)) \
                or not 0 < sample_num <= rowstore.num_rows:
            raise ValueError(f"sample_num must be an integer in [1, {rowstore.num_rows}] "
                             f"(the row store's num_rows), got {sample_num!r}")
        for name, v in (("recall_every", recall_every), ("recall_k", recall_k),
                        ("chunk_rows", chunk_rows)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if getattr(sampler, "num_classes", rowstore.num_rows) != rowstore.num_rows:
            raise ValueError(f"sampler is for {sampler.num_classes} classes but the row store "
                             f"holds {rowstore.num_rows} rows; build both with the same count")
        if interval is not None:
            if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) \
                    or interval <= 0:
                raise ValueError(f"interval must be a positive number of steps (or None for "
                                 f"the sampler's own), got {interval!r}")
            sampler.interval = int(interval)  # the sampler owns the rebuild policy
        self.rowstore = rowstore
        self.sampler = sampler
        self.sample_num = int(sample_num)
        self.spec = LogitSpec(logit, s, m, easy_margin)
        self.num_classes, self.dim = int(rowstore.num_rows), int(rowstore.dim)
        self.recall_every, self.recall_k = int(recall_every), int(recall_k)
        self.chunk_rows = int(chunk_rows)
        if not (logq is False or logq is True or logq == "sample"):
            raise ValueError(f"logq must be False, True (the random top-up's correction) or "
                             f"'sample' (per sample), got {logq!r}")
        self.logq = logq
        self.step = 0  # training steps taken (forward passes in training mode)
        self._picks: torch.Tensor | None = None  # negatives per class, see coverage()
        #: raise at once on a non-finite loss (reads the loss on the host: a GPU sync point)
        self.check_finite = True
        self.lr: float | None = None  # the rows' LR, once set_lr told it
        self.telemetry: dict = {"step": 0, "recall": None, "top1_all": None, "select_s": None,
                                "pull_s": None,
                                "push_s": None}

    @property
    def interval(self) -> int | None:
        """Steps between index rebuilds (the sampler's setting)."""
        return getattr(self.sampler, "interval", None)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, sample_num={self.sample_num},"
                f" logit={self.spec.logit}, s={self.spec.s}, m={self.spec.m}, "
                f"interval={self.interval}, logq={self.logq}")

    # -- what the trainer calls besides forward ----------------------------------------
    # -- index maintenance ---------------------------------------------------------------
    def rebuild_index(self, wait: bool = True) -> None:
        """Rebuild the sampler's index from the current rows now (rank 0 only).

        ``wait=False`` starts a background rebuild; training keeps querying the old index
        until the new one is swapped in. Rows are read through ``rowstore.reader()``, which
        is safe to run on the rebuild thread.
        """
        if hd.rank() != 0:
            return
        read = self.rowstore.reader(self.chunk_rows)
        # start_rebuild also restarts the sampler's interval count from this step
        started = self.sampler.start_rebuild(read, self.step)
        if wait:
            self.sampler.wait_rebuild()
            if not started:  # one was running already: now build from the current rows
                self.sampler.start_rebuild(read, self.step)
                self.sampler.wait_rebuild()

    def _maybe_rebuild(self) -> None:
        # Only rank 0 selects, so only rank 0 holds an index.
        if hd.rank() == 0:
            self.sampler.maybe_rebuild(self.step, self.rowstore.reader(self.chunk_rows))

    # -- the step ------------------------------------------------------------------------
    def _sampler_select(self, features: torch.Tensor, labels: torch.Tensor):
        # the log-Q offsets (or own slots) are asked for only when used: a sampler of one's
        # own needs ``log_weights`` only for logq=True or "sample"
        if self.logq:
            return self.sampler.select(features, labels, self.sample_num, log_weights=self.logq)
        return self.sampler.select(features, labels, self.sample_num)

    def _select(self, features: torch.Tensor, labels: torch.Tensor):
        """Class ids (S,), this rank's labels remapped into them (over the global batch), the
        global features, the ids as selected, and the log-Q offsets: (S,), or (B, S) for this
        rank's samples with ``logq="sample"``, None when off."""
        if not hd.is_dist():
            # an index on the host gets the features there (one sync); a sampler that
            # selects on the device (``selects_on_device``) gets them as they are, and its
            # ids come to the host below (its sync)
            inputs = (features.detach(), labels) if getattr(
                self.sampler, "selects_on_device", False) else _host_inputs(features, labels)
            ids, target, *offsets = self._sampler_select(*inputs)
            if self.logq == "sample":
                offsets = self._sample_offsets(torch.as_tensor(offsets[0]), features.device)
            else:
                offsets = torch.as_tensor(offsets[0]).cpu() if offsets else None
            return (torch.as_tensor(ids, dtype=torch.int64).cpu(),
                    torch.as_tensor(target, dtype=torch.int64), features.detach(),
                    torch.as_tensor(ids, dtype=torch.int64), offsets)
        g_feat = hd.all_gather_tensor(features.detach())
        g_lab = hd.all_gather_tensor(labels)
        sizes = hd.all_gather_tensor(torch.tensor([labels.shape[0]], device=labels.device))
        offset = int(sizes[:hd.rank()].sum())
        offsets = None
        if hd.rank() == 0:
            ids, g_target, *offsets = self._sampler_select(g_feat, g_lab)
            ids = torch.as_tensor(ids, dtype=torch.int64)
            g_target = torch.as_tensor(g_target, dtype=torch.int64)
            offsets = torch.as_tensor(offsets[0]).cpu() if offsets else None
        else:
            ids = g_target = None
        ids = hd.broadcast(ids, 0, shape=(self.sample_num,), dtype=torch.int64,
                           device=torch.device("cpu"))
        g_target = hd.broadcast(g_target, 0, shape=(g_lab.shape[0],), dtype=torch.int64,
                                device=torch.device("cpu"))
        if self.logq == "sample":  # each sample's own slots, (G, 1 + k): k known on rank 0
            own = hd.broadcast(offsets, 0, device=torch.device("cpu"))
            offsets = self._sample_offsets(own[offset:offset + labels.shape[0]],
                                           features.device)
        elif self.logq:
            offsets = hd.broadcast(offsets, 0, shape=(self.sample_num,), dtype=torch.float32,
                                   device=torch.device("cpu"))
        target = g_target[offset:offset + labels.shape[0]]
        return ids.cpu(), target, g_feat, ids, offsets

    def _sample_offsets(self, own: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The per-sample correction's (B, S) offsets from the samples' own slots, built on
        ``device`` (the features'): only the (B, 1 + k) slots travel, not the (B, S) block."""
        return sample_log_weights(own.to(device), self.sample_num, self.num_classes)

    def _recall(self, g_feat: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor
                ) -> tuple[float, float]:
        """``(recall, top1)``: the share of the global batch's true top-``recall_k`` classes
        (exact scores over all rows, read in chunks) that the selection holds, and the
        top-1 accuracy of this rank's samples (the first rows of ``g_feat``) over *all*
        classes, without the margin: what the batch accuracy over the selected columns is
        not."""
        top = exact_topk(g_feat, self.rowstore, self.recall_k, self.spec.normalized,
                         self.chunk_rows)
        chosen = torch.zeros(self.num_classes, dtype=torch.bool)
        chosen[ids.cpu()] = True
        own = top[:labels.shape[0], 0]
        return float(chosen[top].float().mean()), float((own == labels.cpu()).float().mean())

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        check_batch(features, labels, self.dim)
        labels = labels.long()
        training = self.training and torch.is_grad_enabled()
        self._wait_push()
        if training:
            self._maybe_rebuild()
        t0 = time.perf_counter()
        ids, target, g_feat, ids_sel, offsets = self._select(features, labels)
        t1 = time.perf_counter()
        ids_np = ids.numpy()
        if ids_np.shape != (self.sample_num,):
            raise RuntimeError(f"sampler returned {ids_np.shape[0]} class ids, expected "
                               f"sample_num={self.sample_num}")
        if training:  # negatives' coverage: every selected column but this rank's labels,
            # counted where the ids are (no host sync: a 0/1 weight per column, no masking)
            neg = torch.ones(self.sample_num, dtype=torch.int64, device=target.device)
            neg[target] = 0
            if self._picks is None or self._picks.device != target.device:
                self._picks = torch.zeros(self.num_classes, dtype=torch.int64,
                                          device=target.device)
            self._picks.index_add_(0, ids_sel.to(target.device), neg)
        w_np = self.rowstore.pull(ids_np)
        t2 = time.perf_counter()
        dtype = features.dtype if features.is_floating_point() else torch.float32
        weight = _to_device(torch.from_numpy(w_np), features.device, dtype)
        target = _to_device(target, features.device)
        if training:
            weight.requires_grad_(True)
            weight.register_hook(self._push_hook(ids_np, w_np, self.step))
        logits, plain = self.spec.with_plain_target(features, weight, target)
        if offsets is None:
            loss = F.cross_entropy(logits, target)
        else:  # log-Q: a label's offset is 0; (S,) broadcasts over the batch, (B, S) per sample
            loss = F.cross_entropy(logits + _to_device(offsets, logits.device, logits.dtype),
                                   target)
        if self.check_finite and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"sampled-head loss became {float(loss)} at step "
                                     f"{self.step}")
        tel = self.telemetry
        tel["select_s"], tel["pull_s"] = t1 - t0, t2 - t1
        if training:
            self.step += 1
            tel["step"] = self.step
            if self.recall_every and self.step % self.recall_every == 0 and hd.rank() == 0:
                tel["recall"], tel["top1_all"] = self._recall(g_feat, ids_sel, labels)
                logger.info("step %d: selection recall@%d %.3f, batch top-1 over all %d "
                            "classes %.3f (index age %s steps)", self.step, self.recall_k,
                            tel["recall"], self.num_classes, tel["top1_all"],
                            getattr(self.sampler, "index_age", None))
        return HeadOutput(loss, logits, target, plain)

    def _push_hook(self, ids_np: np.ndarray, w_np: np.ndarray, step: int):
        state = {"pushed": False}
        # every rank's sampler has the same fresh-rows setting; only rank 0's is queried
        fresh = getattr(self.sampler, "fresh", None) is not None
        note = self.sampler.note_rows if fresh and hd.rank() == 0 else None
        store = self.rowstore
        threaded = getattr(store, "async_push", False)

        def hook(grad: torch.Tensor):
            if state["pushed"]:
                raise RuntimeError("backward ran twice through one sampled-head step; its row "
                                   "gradient was already pushed (one push per forward)")
            state["pushed"] = True
            lr = self.lr
            if not threaded:
                # note: a device-to-host copy, a sync point on CUDA; the push needs the values.
                g = grad.detach().to(device="cpu", dtype=torch.float32).numpy()
                self._push_rows(store, ids_np, w_np, g, None, note, lr, step)
                return None
            # no host wait here: the copies are queued behind the backward's kernels and the
            # store's thread waits for them; a mean the fresh rows need is all-reduced now,
            # before the backbone's backward (and its DDP collectives) begins
            g_host = host_copy(grad)
            mean_host = host_copy(hd.all_reduce_mean(grad.detach().float())) \
                if fresh and hd.is_dist() else None
            store.submit(self._push_rows, store.inner, ids_np, w_np, g_host, mean_host, note,
                         lr, step)
            return None

        return hook

    def _push_rows(self, store, ids_np, w_np, g, mean, note, lr, step) -> None:
        """Push one step's row gradient ``g`` (numpy, or ``(host tensor, event)`` from the
        hook) to ``store``, then tell the sampler the rows' new values (fresh rows)."""
        t0 = time.perf_counter()
        g, mean = _host_array(g), _host_array(mean)
        applied = store.push(ids_np, g)
        if applied is not None:
            g = applied                 # the local store's mean over the ranks
        elif mean is not None:
            g = mean                    # the ranks' mean, all-reduced in the hook
        elif getattr(self.sampler, "fresh", None) is not None and hd.is_dist():
            # the server steps with the ranks' mean gradient; every rank joins the mean
            g = hd.all_reduce_mean(torch.from_numpy(g)).numpy()
        if note is not None:
            # these rows just changed: a sampler with fresh_rows searches them beside
            # its (older) index. Their new values, estimated as w - lr * g: exact with
            # momentum 0 and no weight decay (--row-momentum 0), otherwise for a row's
            # first update; renorm changes no direction, and cosine search ignores norms.
            note(ids_np, w_np if lr is None else w_np - np.float32(lr) * g, step)
        self.telemetry["push_s"] = time.perf_counter() - t0
