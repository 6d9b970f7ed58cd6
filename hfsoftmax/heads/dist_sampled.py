"""The HF-Softmax sampled head with its classifier rows sharded over the
``torch.distributed`` ranks (trainer ``--row-store dist``): the multi-GPU path without a
parameter server.

Zhang, Yang, Yan, Lin, "Accelerated Training for Massive Classification via Dynamic Class
Selection" (AAAI 2018) select each batch's softmax columns; Megatron-LM's vocabulary-parallel
cross-entropy (Shoeybi et al., 2019) and Partial FC (An et al., ICCVW 2021) shard a
classifier's columns over the ranks. Here both: rank ``r`` of W holds the rows
``[r*N//W, (r+1)*N//W)`` and their momentum (:class:`~hfsoftmax.rowstore_dist.DistRowStore`)
and, per step,

1. all-gathers the global batch's features (differentiable:
   :func:`~hfsoftmax.heads.dist_softmax.gather_features`) and labels;
2. selects the classes over the global batch, the same ids on every rank with no broadcast
   (:class:`~hfsoftmax.samplers.sharded.ShardSelector`: labels, then the nearest classes
   found as every shard's top-k merged over the ranks, then a random top-up from an RNG
   seeded alike on every rank; ``sample_num == num_classes``: all classes, the full softmax
   sharded);
3. pulls the selected rows of its shard and computes the logits of the *global* batch
   against them only (:func:`~hfsoftmax.heads.dist_softmax.shard_logits`; a margin applies
   on the one rank holding a sample's target column), adds the log-Q offsets of those
   columns, and the cross-entropy's normaliser is combined over the ranks by all-reduces
   (max, then sum: :func:`~hfsoftmax.heads.dist_softmax.sharded_cross_entropy`);
4. the loss is the global batch's mean, the same on every rank; its backward gives this
   rank's rows the gradient of that loss, which a hook applies to its shard by the rule's
   SGD (no pushes to anyone), and the features the sum of every rank's gradient, sliced back
   to this rank's samples and scaled by W for DDP's averaging.

So W ranks at batch B train as one process at batch W*B (to float round-off; tested with
2 gloo processes), and in a world of one the head is the sampled head over one shard.

:class:`~hfsoftmax.heads.base.HeadOutput`: ``loss`` (the global mean), ``logits`` (B, 2)
for this rank's samples: the target logit (with the margin) and the best other selected
class's, all a correct count needs since the columns are spread over the ranks; ``target``
zeros; ``plain_target`` the target logit without the margin.

>>> store = DistRowStore(N, 256, rule.sgd(lr=0.1, weight_decay=5e-4))
>>> sel = ShardSelector(N, 256, store.start, store.stop, metric="cosine", seed=0)
>>> head = DistSampledHead(store, sel, sample_num=1000, logit="cosface", s=64.0, m=0.35)
>>> out = head(features, labels); out.loss.backward()   # this rank's rows stepped
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from .. import distributed as hd
from ..samplers.selection import sample_log_weights
from .base import HeadOutput, RowStoreHeadMixin, check_batch, register_head
from .dist_softmax import gather_features, shard_logits, sharded_cross_entropy
from .logits import DEFAULT_SCALE, LogitSpec
from .push import host_array, host_copy, to_device

__all__ = ["DistSampledHead"]

logger = logging.getLogger(__name__)


@register_head("dist-sampled")
class DistSampledHead(RowStoreHeadMixin, nn.Module):
    """Softmax over ``sample_num`` classes selected over the global batch, the rows sharded
    over the ranks; see the module docstring. ``rowstore``: this rank's
    :class:`~hfsoftmax.rowstore_dist.DistRowStore` (or a
    :class:`~hfsoftmax.heads.push.ThreadedRowStore` around it); ``selector``: a
    :class:`~hfsoftmax.samplers.sharded.ShardSelector` for the same shard (also reached as
    ``sampler``: its RNG goes into checkpoints). ``logq``: False, True (the random top-up's
    correction) or ``"sample"`` (per sample), as :class:`~hfsoftmax.heads.SampledHead`'s.
    ``recall_every`` (0: off): every this many steps, the share of the global batch's true
    top-``recall_k`` classes the selection holds (exact, over every rank's rows). The head
    has no parameters; :meth:`set_lr` sets the rows' LR."""

    def __init__(self, rowstore, selector, sample_num: int, logit: str = "linear",
                 s: float = DEFAULT_SCALE, m: float | None = None, easy_margin: bool = False,
                 logq: bool | str = False, recall_every: int = 0, recall_k: int = 10):
        super().__init__()
        n = int(rowstore.num_rows)
        if isinstance(sample_num, bool) or not isinstance(sample_num, (int, np.integer)) \
                or not 0 < sample_num <= n:
            raise ValueError(f"sample_num must be an integer in [1, {n}] (the row store's "
                             f"num_rows), got {sample_num!r}")
        if (selector.num_classes, selector.start, selector.stop) != \
                (n, rowstore.start, rowstore.stop):
            raise ValueError(f"the selector is for rows [{selector.start}, {selector.stop}) of "
                             f"{selector.num_classes}, the row store holds [{rowstore.start}, "
                             f"{rowstore.stop}) of {n}; build both for the same shard")
        if not (logq is False or logq is True or logq == "sample"):
            raise ValueError(f"logq must be False, True (the random top-up's correction) or "
                             f"'sample' (per sample), got {logq!r}")
        for name, v in (("recall_every", recall_every), ("recall_k", recall_k)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        self.rowstore, self.sampler = rowstore, selector
        self.sample_num, self.logq = int(sample_num), logq
        self.spec = LogitSpec(logit, s, m, easy_margin)
        self.num_classes, self.dim = n, int(rowstore.dim)
        self.recall_every, self.recall_k = int(recall_every), int(recall_k)
        self.step = 0
        self.check_finite = True   # a host read of the loss every step; the trainer turns it off
        self.lr: float | None = None
        self._picks: torch.Tensor | None = None
        self.telemetry: dict = {"step": 0, "recall": None, "top1_all": None, "select_s": None,
                                "pull_s": None, "push_s": None}

    @property
    def interval(self) -> int:
        """Steps between reloads of the shard's device copy (the selector's)."""
        return self.sampler.interval

    def extra_repr(self) -> str:
        st = self.rowstore
        return (f"num_classes={self.num_classes}, dim={self.dim}, rows=[{st.start}, "
                f"{st.stop}), sample_num={self.sample_num}, logit={self.spec.logit}, "
                f"s={self.spec.s}, m={self.spec.m}, logq={self.logq}")

    # -- the step ------------------------------------------------------------------------
    def _offsets(self, extra, slots: np.ndarray, device) -> torch.Tensor | None:
        """This rank's columns of the log-Q offsets: (n,) or (G, n); None when off."""
        if not self.logq:
            return None
        if self.logq == "sample":  # (G, 1 + k) own slots -> (G, S) on the device -> columns
            full = sample_log_weights(to_device(torch.from_numpy(extra), device),
                                      self.sample_num, self.num_classes)
            return full[:, to_device(torch.from_numpy(slots), device)]
        return to_device(torch.from_numpy(np.ascontiguousarray(extra[slots])), device)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """One step over this rank's ``features`` (B, D) and ``labels`` (B,); every rank
        must call it (collectives). See the module docstring for the steps and the
        :class:`HeadOutput` it returns."""
        check_batch(features, labels, self.dim)
        labels = labels.long()
        training = self.training and torch.is_grad_enabled()
        self._wait_push()
        store, dev = self.rowstore, features.device
        t0 = time.perf_counter()
        sizes = hd.all_gather_sizes(features.shape[0])
        offset, b = sum(sizes[:hd.rank()]), features.shape[0]
        g_feat = gather_features(features, sizes, offset)
        g_lab = hd.all_gather_tensor(labels, sizes)
        self.sampler.refresh_if_due(self.step, store.read_shard, store.version, training, dev)
        ids, g_target, extra = self.sampler.select(g_feat.detach(), g_lab, self.sample_num,
                                                   self.logq)
        t1 = time.perf_counter()
        # this rank's columns: the selected ids in its shard, and each sample's target
        # column among them (-1: another rank's)
        slots = np.flatnonzero((ids >= store.start) & (ids < store.stop))
        col = np.full(ids.size, -1, dtype=np.int64)
        col[slots] = np.arange(slots.size)
        mine = ids[slots]
        w_np = store.pull(mine)
        t2 = time.perf_counter()
        dtype = features.dtype if features.is_floating_point() else torch.float32
        weight = to_device(torch.from_numpy(w_np), dev, dtype)
        target = to_device(torch.from_numpy(col[g_target]), dev)
        if training:
            if slots.size:
                weight.requires_grad_(True)
                weight.register_hook(self._push_hook(mine))
            else:  # none of the selection is here: the shard still takes the step
                self._step_rows(store, mine, np.zeros((0, self.dim), np.float32))
            self._count_picks(ids, g_target, dev)
        logits, plain = shard_logits(self.spec, g_feat, weight, target)
        offsets = self._offsets(extra, slots, dev)
        z = logits if offsets is None else logits + offsets.to(logits.dtype)
        loss_g, z_t, plain_t, other = sharded_cross_entropy(z, target, logits.detach(), plain)
        loss = loss_g.mean()
        if self.check_finite and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"sharded sampled-head loss became {float(loss)} at "
                                     f"step {self.step}")
        own = slice(offset, offset + b)
        out_logits = torch.stack([z_t[own], other[own]], dim=1)
        tel = self.telemetry
        tel["select_s"], tel["pull_s"] = t1 - t0, t2 - t1
        if training:
            self.step += 1
            tel["step"] = self.step
            if self.recall_every and self.step % self.recall_every == 0:
                tel["recall"], tel["top1_all"] = self._recall(g_feat, ids, g_lab, own)
                if hd.is_main():
                    logger.info("step %d: selection recall@%d %.3f, batch top-1 over all %d "
                                "classes %.3f", self.step, self.recall_k, tel["recall"],
                                self.num_classes, tel["top1_all"])
        return HeadOutput(loss, out_logits, torch.zeros_like(labels), plain_t[own])

    def _count_picks(self, ids: np.ndarray, g_target: np.ndarray, dev) -> None:
        """Negatives' coverage: every selected column but the global batch's labels."""
        neg = np.ones(ids.size, dtype=np.int64)
        neg[g_target] = 0
        if self._picks is None or self._picks.device != dev:
            self._picks = torch.zeros(self.num_classes, dtype=torch.int64, device=dev)
        self._picks.index_add_(0, to_device(torch.from_numpy(ids), dev),
                               to_device(torch.from_numpy(neg), dev))

    def _recall(self, g_feat, ids: np.ndarray, g_lab, own: slice) -> tuple[float, float]:
        """(share of the true top-``recall_k`` held by the selection, this rank's samples'
        top-1 over all classes): every rank joins (collectives)."""
        top = self.sampler.exact_topk(g_feat, self.rowstore.read_shard(), self.recall_k).cpu()
        chosen = torch.zeros(self.num_classes, dtype=torch.bool)
        chosen[torch.from_numpy(ids)] = True
        valid = top >= 0
        recall = float(chosen[top.clamp_min(0)][valid].float().mean())
        top1 = float((top[own, 0] == g_lab[own].cpu()).float().mean())
        return recall, top1

    def _push_hook(self, mine: np.ndarray):
        state = {"done": False}
        store = self.rowstore

        def hook(grad: torch.Tensor):
            if state["done"]:
                raise RuntimeError("backward ran twice through one sharded sampled-head step; "
                                   "its rows were already stepped (one step per forward)")
            state["done"] = True
            if getattr(store, "async_push", False):
                # the SGD on the store's thread while the backbone's backward runs; it has
                # no collective, so it may overlap DDP's
                store.submit(self._step_rows, store.inner, mine, host_copy(grad))
            else:
                # note: a device-to-host copy, a sync point on CUDA
                self._step_rows(store, mine, grad.detach().to("cpu", torch.float32).numpy())
            return None

        return hook

    def _step_rows(self, store, mine: np.ndarray, g) -> None:
        """One SGD step of this rank's shard with the gradient ``g`` of its rows ``mine``;
        their new values go into the selector's device copy."""
        t0 = time.perf_counter()
        store.push(mine, host_array(g))
        if mine.size:
            self.sampler.note(mine, store.pull(mine))
        self.telemetry["push_s"] = time.perf_counter() - t0
