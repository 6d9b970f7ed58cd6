"""A softmax whose columns are spread over the ``torch.distributed`` ranks: the pieces of
the sharded sampled head (:mod:`hfsoftmax.heads.dist_sampled`).

The model-parallel classifier idea of Megatron-LM's vocabulary-parallel cross-entropy
(Shoeybi et al., 2019) and InsightFace's Partial FC (An et al., ICCVW 2021), written here
from the formulas: every rank holds some of the columns (classes) of every sample's
logits, for the *global* batch.

* :func:`gather_features`: the global batch's features, all-gathered, with autograd: the
  backward sums every rank's gradient of them (each rank saw only its own columns) and keeps
  this rank's samples, times the world size W, so that DDP's *average* of the backbone's
  gradients over the ranks is the gradient of the global batch's mean loss.
* :func:`shard_logits`: the logits of the global batch against this rank's columns
  (linear, CosFace or ArcFace: :class:`~hfsoftmax.heads.logits.LogitSpec`'s formulas), the
  margin applied where a sample's target column is one of this rank's.
* :func:`sharded_cross_entropy`: each sample's ``logsumexp(z) - z_target`` over all ranks'
  columns, combined by two all-reduces (the maxima, then the sums of ``exp(z - max)``, the
  target logits and the plain target logits); its backward is local, ``(softmax - onehot) x
  grad``, as every rank computes the same loss of the same global batch.

>>> g_feat = gather_features(features, sizes, offset)        # (G, D), G = sum(sizes)
>>> z, plain = shard_logits(spec, g_feat, my_rows, my_target)  # (G, n_mine), (G,)
>>> loss, z_t, plain_t, other = sharded_cross_entropy(z, my_target, z.detach(), plain)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import distributed as hd
from .logits import LogitSpec

__all__ = ["gather_features", "shard_logits", "sharded_cross_entropy"]


class _GatherFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, sizes, offset):
        ctx.offset, ctx.n, ctx.world = offset, features.shape[0], len(sizes)
        return hd.all_gather_tensor(features, sizes)

    @staticmethod
    def backward(ctx, grad):
        total = hd.all_reduce(grad.contiguous(), "sum")
        return total[ctx.offset:ctx.offset + ctx.n] * ctx.world, None, None


def gather_features(features: torch.Tensor, sizes: list[int], offset: int) -> torch.Tensor:
    """All ranks' ``features`` concatenated in rank order (``sizes``: every rank's batch,
    ``offset``: where this rank's samples start), differentiable as the module docstring
    says. In a world of one: ``features`` itself."""
    if not hd.is_dist():
        return features
    return _GatherFeatures.apply(features, list(sizes), int(offset))


def shard_logits(spec: LogitSpec, features: torch.Tensor, weight: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (G, n), plain (G,))`` of ``features`` (G, D) against this rank's rows
    ``weight`` (n, D); ``target`` (G,) is each sample's target column among them, -1 where
    it is another rank's. ``plain``: the target logit without the margin where it is here,
    else 0 (detached). With every target here, exactly ``spec.with_plain_target``."""
    g, n = features.shape[0], weight.shape[0]
    has = target >= 0
    t = target.clamp_min(0)
    rows = torch.arange(g, device=features.device)
    zero = features.new_zeros(g)
    if spec.logit == "linear":
        logits = F.linear(features, weight)
        plain = torch.where(has, logits[rows, t], zero) if n else zero
        return logits, plain.detach()
    cos = F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1)).clamp(-1.0, 1.0)
    if n == 0:
        return spec.s * cos, zero
    ct = cos[rows, t]
    # the margin only where the target column is this rank's; elsewhere the column keeps
    # its own value (written back unchanged)
    logits = spec.s * cos.index_put((rows, t), torch.where(has, spec.target_logit(ct), ct))
    return logits, torch.where(has, spec.s * ct, zero).detach()


class _ShardedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target, m, plain):
        has = target >= 0
        t = target.clamp_min(0)[:, None]
        e = torch.exp(z - m[:, None])
        zt = torch.where(has, z.gather(1, t).squeeze(1), 0.0) if z.shape[1] else \
            torch.zeros_like(m)
        sums = hd.all_reduce(torch.stack([e.sum(1), zt, plain], 1), "sum")
        loss = torch.log(sums[:, 0]) + m - sums[:, 1]
        ctx.save_for_backward(e / sums[:, :1], target)
        z_t, plain_t = sums[:, 1].clone(), sums[:, 2].clone()
        ctx.mark_non_differentiable(z_t, plain_t)
        return loss, z_t, plain_t

    @staticmethod
    def backward(ctx, grad_loss, _gz, _gp):
        p, target = ctx.saved_tensors
        grad = p * grad_loss[:, None]
        if grad.shape[1]:
            has = (target >= 0).to(grad.dtype)
            grad.scatter_add_(1, target.clamp_min(0)[:, None], (-grad_loss * has)[:, None])
        return grad, None, None, None


def sharded_cross_entropy(z: torch.Tensor, target: torch.Tensor, plain_logits: torch.Tensor,
                          plain: torch.Tensor):
    """Per-sample cross-entropy over the columns of all ranks; every rank calls it with its
    own columns of the same global batch and gets the same values.

    ``z`` (G, n): this rank's logits as the loss sees them (margin and any log-Q offsets
    in); ``target`` (G,): the target column here, -1 where it is another rank's;
    ``plain_logits`` (G, n) the logits without the offsets and ``plain`` (G,) the target
    logit without the margin where it is here (else 0), for the accuracy. Returns
    ``(loss (G,), z_target, plain_target, best_other)``, the last three detached:
    ``best_other`` is each sample's highest logit (without offsets) among the other
    classes. The loss is differentiable in ``z``.
    """
    z = z.float()
    g = z.shape[0]
    with torch.no_grad():
        if z.shape[1]:
            m_loc = z.max(dim=1).values
            masked = plain_logits.float().clone()
            t = target.clamp_min(0)[:, None]
            masked.scatter_(1, t, torch.where(target[:, None] >= 0, -math.inf,
                                              masked.gather(1, t)))
            other_loc = masked.max(dim=1).values
        else:
            m_loc = other_loc = z.new_full((g,), -math.inf)
        mx = hd.all_reduce(torch.stack([m_loc, other_loc], 1), "max")
    loss, z_t, plain_t = _ShardedCE.apply(z, target, mx[:, 0].contiguous(), plain.float())
    return loss, z_t, plain_t, mx[:, 1]
