"""HF-Softmax's selection over classifier rows sharded across ``torch.distributed`` ranks.

Zhang et al. (AAAI 2018) select each batch's classes as its labels, the classes nearest to
its features and a random top-up (``selection.py``, the one rule). With the rows sharded
over the ranks (:class:`~hfsoftmax.rowstore_dist.DistRowStore`, ``--row-store dist``) no
rank sees all rows, so the nearest classes are found as a model-parallel top-k
(Partial FC shards its classifier the same way; its negatives are random only):

1. every rank holds an exact copy of *its* shard on the features' device
   (:class:`~hfsoftmax.samplers.device_rows.DeviceRows`: normalised for cosine; the head
   writes every stepped row's new value into it, so it is never stale) and scores the
   *global* batch (all-gathered features) against it: a chunked matmul + top-k;
2. the per-shard candidates (score, global id) are all-gathered and merged on every rank
   into the global top-k (ties: the lower id first), the same on every rank and the same as
   one process would find over all rows;
3. the rule runs on the host on every rank with the same inputs and an RNG seeded alike, so
   every rank makes the same selection, with no broadcast: W ranks select what one process
   selects for the W-fold batch (the rows' scores agree to float round-off).

Without a neighbour search (``nearest=False``, the ``random`` sampler) the selection is the
labels plus the random top-up. The copy is reloaded from the shard when the rows were
replaced (a restore, ``--init-rows``) and every ``interval`` steps (the lazy catch-up weight
decay shrinks rows that were not stepped; a cosine search does not see it), in the
background where ``background`` is set.

>>> sel = ShardSelector(num_classes, 256, store.start, store.stop, metric="cosine", seed=0)
>>> sel.refresh_if_due(step, store.read_shard, store.version, training=True)
>>> ids, target, extra = sel.select(global_features, global_labels, sample_num=1000)
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .. import distributed as hd
from .device_rows import DeviceRows
from .selection import (check_labels, neighbour_slots, neighbours_per_sample,
                        select_with_correction)
from .selector import check_policy

__all__ = ["ShardSelector", "merge_shard_topk"]

logger = logging.getLogger(__name__)


def merge_shard_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The global top-``k`` ids per row from every rank's candidates: this rank's (G, k)
    ``scores`` and global ``ids`` (padding: id -1, score -inf) are all-gathered and merged,
    best first, ties to the lower id, -1 where fewer than ``k`` exist. On ``ids``' device;
    the same tensor on every rank."""
    g = scores.shape[0]
    packed = torch.cat([scores.double(), ids.double()], dim=1)  # ids < 2**53: exact
    every = hd.all_gather_tensor(packed, [g] * hd.world_size())  # (W * G, 2k), rank order
    w = every.shape[0] // max(g, 1) if g else 1
    every = every.reshape(w, g, 2 * k)
    cand_s = every[:, :, :k].permute(1, 0, 2).reshape(g, w * k)
    cand_i = every[:, :, k:].permute(1, 0, 2).reshape(g, w * k).long()
    cand_s = torch.where(cand_i < 0, torch.full_like(cand_s, -math.inf), cand_s)
    # (score desc, id asc): sort by id, then a stable sort by score
    by_id = cand_i.argsort(dim=1, stable=True)
    cand_s, cand_i = cand_s.gather(1, by_id), cand_i.gather(1, by_id)
    order = cand_s.argsort(dim=1, descending=True, stable=True)[:, :k]
    out = cand_i.gather(1, order)
    return torch.where(cand_s.gather(1, order) == -math.inf, torch.full_like(out, -1), out)


class ShardSelector:
    """The selection of one rank over its shard ``[start, stop)`` of ``num_classes`` rows;
    see the module docstring. ``nearest``: search the nearest classes (False: labels +
    random). ``seed`` must be the same on every rank (the random top-up's RNG, ``rng``).
    ``device`` / ``dtype``: the copy's (None: the features' device at the first refresh;
    float32 on the CPU, float16/bfloat16 on CUDA as the ``device`` sampler's). Also what
    the trainer's checkpoint and close reach as ``head.sampler``."""

    def __init__(self, num_classes: int, dim: int, start: int, stop: int, *,
                 metric: str = "ip", seed: int = 0, interval: int = 100,
                 background: bool = True, random_share: float = 0.0,
                 neighbour_oversample: float = 1.25, nearest: bool = True, device=None,
                 dtype=None, chunk_rows: int = 65536):
        check_policy(interval=interval, neighbour_oversample=neighbour_oversample,
                     random_share=random_share)
        if metric not in ("ip", "cosine"):
            raise ValueError(f"Unknown metric {metric!r}. Valid: ip, cosine")
        if not 0 <= start < stop <= num_classes:
            raise ValueError(f"shard [{start}, {stop}) is not a non-empty part of "
                             f"[0, {num_classes})")
        self.num_classes, self.dim, self.metric = int(num_classes), int(dim), metric
        self.start, self.stop = int(start), int(stop)
        self.seed, self.rng = int(seed), np.random.default_rng(seed)
        self.interval, self.background = int(interval), bool(background)
        self.random_share, self.neighbour_oversample = float(random_share), \
            float(neighbour_oversample)
        self.nearest = bool(nearest)
        self._opts = {"device": device, "dtype": dtype, "chunk_rows": chunk_rows}
        self.rows: DeviceRows | None = None
        self._version: int | None = None   # the store's version the copy holds
        self._last_refresh: int | None = None
        self.last_num_neighbours = 0

    @property
    def name(self) -> str:
        """What the trainer's log calls this selection."""
        return "sharded-exact" if self.nearest else "random"

    def __repr__(self):
        return (f"ShardSelector(rows [{self.start}, {self.stop}) of {self.num_classes} x "
                f"{self.dim}, metric={self.metric!r}, nearest={self.nearest}, "
                f"interval={self.interval})")

    # ------------------------------------------------------------------ the device copy
    def refresh_if_due(self, step: int, read_shard, version: int, training: bool,
                       device: torch.device | None = None) -> bool:
        """Load the copy where there is none or the rows were replaced (``version``
        changed: waited for), and every ``interval`` training steps (in the background
        where set). True if a refresh started."""
        if not self.nearest:
            return False
        if self.rows is None:
            opts = dict(self._opts)
            opts["device"] = opts["device"] if opts["device"] is not None else device
            self.rows = DeviceRows(self.stop - self.start, self.dim, metric=self.metric,
                                   **opts)
        self.rows.raise_error()
        if self._version != version or not self.rows.has_index:
            self.rows.join()
            self.rows.rebuild(read_shard, step)
        elif training and step - self._last_refresh >= self.interval:
            if self.background:
                if not self.rows.start_rebuild(read_shard, step):
                    return False
            else:
                self.rows.rebuild(read_shard, step)
        else:
            return False
        self._version, self._last_refresh = version, int(step)
        return True

    def note(self, ids, values) -> None:
        """Write stepped rows' new values (global ``ids`` of this shard) into the copy."""
        if self.rows is not None:
            local = np.asarray(ids, dtype=np.int64) - self.start
            self.rows.note(local, values)

    # ------------------------------------------------------------------ selection
    def _shard_topk(self, g_feat: torch.Tensor, k: int) -> torch.Tensor:
        """(G, k) global ids of the global top-``k`` over all shards (a collective)."""
        scores, ids = self.rows.topk(g_feat, min(k, self.stop - self.start))
        return self._merge(scores, ids, k)

    def _merge(self, scores: torch.Tensor, local_ids: torch.Tensor, k: int) -> torch.Tensor:
        ids = local_ids + self.start
        if ids.shape[1] < k:  # a shard smaller than k: padded, never chosen
            pad = k - ids.shape[1]
            scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), -math.inf)], 1)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
        return merge_shard_topk(scores, ids, k)

    def select(self, g_feat: torch.Tensor, g_lab: torch.Tensor, sample_num: int,
               log_weights: bool | str = False):
        """``(class_ids (S,), remapped (G,), extra)`` as numpy, the same on every rank:
        :func:`~hfsoftmax.samplers.selection.select_classes` over the global batch
        (``g_feat`` (G, D) and ``g_lab`` (G,), all-gathered) with the neighbours merged over
        the ranks. ``extra``: None; with ``log_weights=True`` the (S,) offsets of
        :func:`~.selection.topup_log_weights`; with ``"sample"`` each sample's own slots,
        (G, 1 + k) (:func:`~.selection.own_slots`). Every rank must call it (collectives)."""
        g = g_feat.shape[0]
        searching = (self.nearest and 0 < sample_num < self.num_classes and g > 0)
        nb = None
        if searching:
            # the most neighbours this batch can need (one distinct label): every rank asks
            # the same k, so the merge is one collective; trimmed once the labels are known
            need_max = neighbour_slots(sample_num, 1, self.random_share)
            if need_max > 0:
                k_max = min(neighbours_per_sample(need_max, g, self.neighbour_oversample),
                            self.num_classes)
                nb = self._shard_topk(g_feat.detach(), k_max)
        if nb is not None and nb.device == g_lab.device:
            # note: the selection's one device-to-host copy (a sync on a GPU)
            packed = torch.cat([g_lab.long()[:, None], nb], dim=1).cpu().numpy()
            lab, nb = packed[:, 0], packed[:, 1:]
        else:
            lab = g_lab.detach().cpu().numpy()
            nb = None if nb is None else nb.cpu().numpy()
        lab = check_labels(lab, self.num_classes)
        neighbours = None
        if nb is not None:
            need = neighbour_slots(sample_num, np.unique(lab).size, self.random_share)
            if need > 0:
                k = neighbours_per_sample(need, g, self.neighbour_oversample)
                neighbours = nb[:, :min(k, nb.shape[1])]
        ids, remapped, n_near, extra = select_with_correction(
            lab, neighbours, sample_num, self.num_classes, self.rng, self.random_share,
            log_weights)
        self.last_num_neighbours = n_near
        return ids, remapped, extra

    def exact_topk(self, g_feat: torch.Tensor, shard_rows: np.ndarray, k: int) -> torch.Tensor:
        """(G, k) global ids of the true top-``k`` classes over all ranks' current rows
        (``shard_rows``: this rank's, from the store), by this selector's metric: what the
        recall telemetry compares the selection with. A collective."""
        from .exact import chunked_topk

        q = g_feat.detach().float().cpu()
        w = torch.from_numpy(shard_rows)
        if self.metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
            w = torch.nn.functional.normalize(w, dim=1)
        k = min(int(k), self.num_classes)
        scores, ids = chunked_topk(q, w, min(k, w.shape[0]))
        return self._merge(scores, ids, k)

    # ------------------------------------------------------------------ telemetry, end
    def stats(self) -> dict:
        """The copy's last reload time and count, and the last selection's neighbours."""
        r = self.rows
        return {"rebuild_s": None if r is None else r.last_rebuild_s,
                "rebuilds": 0 if r is None else r.rebuilds,
                "neighbours_selected": self.last_num_neighbours}

    def close(self, timeout: float | None = None) -> None:
        """Wait for a running refresh and free the copy."""
        if self.rows is not None:
            self.rows.close(timeout)
