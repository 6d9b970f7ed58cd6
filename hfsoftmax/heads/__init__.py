"""Classifier heads: the full softmax and the HF-Softmax sampled head.

``build_head("full", num_classes, dim, logit=...)`` or
``build_head("sampled", rowstore, sampler, sample_num, logit=...)``, or with the rows
sharded over the torch.distributed ranks ``build_head("dist-sampled", dist_rowstore,
shard_selector, sample_num, logit=...)``; all return
:class:`HeadOutput` ``(loss, logits, target)`` from ``forward(features, labels)``.
Logit types: ``linear``, ``cosface``, ``arcface`` (one implementation in :mod:`.logits`).
"""
from .base import HeadOutput, build_head, correct_count, list_heads, register_head
from .full import FullHead
from .logits import DEFAULT_MARGINS, LOGIT_TYPES, LogitSpec
from .dist_sampled import DistSampledHead
from .sampled import SampledHead, exact_topk

__all__ = ["HeadOutput", "correct_count", "build_head", "list_heads", "register_head", "FullHead",
           "SampledHead", "DistSampledHead", "LogitSpec", "LOGIT_TYPES", "DEFAULT_MARGINS",
           "exact_topk"]
