"""The trainer's head from its settings: the full softmax, or the sampled head with its
sampler and row store, built by the sampled head's one rule
(:class:`~hfsoftmax.heads.sampled_config.SampledRule`).

>>> head, store = build_head_from_args(args, num_classes, rule)   # store: None for full
"""
from __future__ import annotations

import argparse
from typing import Any

from .. import distributed as hd
from .sampled_config import MARGIN_HEADS, SampledRule

__all__ = ["build_head_from_args", "sampler_options", "neighbour_slots_per_sample",
           "logit_kwargs", "HEAD_LOGQ"]

#: the rule's ``logq`` as :class:`~hfsoftmax.heads.SampledHead` takes it
HEAD_LOGQ = {"sample": "sample", "random": True, "off": False}


def logit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The head's logit type, scale and margin: ``--scale`` / ``--margin``, else the
    backbone's defaults for the margin heads (:func:`hfsoftmax.models.head_defaults`: the
    small CPU nets train at s 30, m 0.2), else the head's own (s 64; cosface 0.35, arcface
    0.5)."""
    from ..models import head_defaults

    kw: dict[str, Any] = {"logit": args.head}
    if args.head == "linear":
        if args.margin is not None:
            kw["m"] = args.margin
        return kw
    arch = head_defaults(args.arch)
    scale = args.scale if args.scale is not None else arch.get("scale")
    margin = args.margin if args.margin is not None else arch.get(args.head)
    if scale is not None:
        kw["s"] = scale
    if margin is not None:
        kw["m"] = margin
    return kw


def sampler_options(args: argparse.Namespace, rule: SampledRule, rank: int = 0) -> dict:
    """``build_sampler`` keyword options from the trainer's flags and the rule; a
    ``--sampler-opt`` key the trainer sets itself, or that the backend does not take, is an
    error naming the flag to use."""
    from ..engine.config import parse_key_values

    opts: dict[str, Any] = {"interval": args.interval, "background": args.background_rebuild,
                            "random_share": rule.random_share, "fresh_rows": rule.fresh_rows}
    if args.sampler == "annoy":
        opts["ntrees"] = args.ntrees
    extra = parse_key_values(args.sampler_opt)
    clash = sorted(set(extra) & set(opts) | set(extra) & {"metric", "seed", "process"})
    if clash:
        raise ValueError(f"--sampler-opt {', '.join(clash)}: set by the trainer's own flags "
                         "(--interval, --ntrees, --fresh-rows, --random-share, "
                         "--background-rebuild, --head, --seed); use those")
    opts.update(extra)
    # Only rank 0 selects (over the global batch), so only rank 0 needs an index process.
    if args.index_threads:
        if not _uses_process(args):
            raise ValueError(f"--index-threads {args.index_threads} applies to the index "
                             "process only; add --sampler-process (an in-process index uses "
                             "the trainer's --threads)")
        if rank == 0:
            opts["threads"] = args.index_threads
    elif args.index_threads is None and _uses_process(args) and rank == 0:
        from ..engine.recipe import default_index_threads

        # not the OMP_NUM_THREADS=1 torchrun gives the trainer: the host's cores per process
        opts["threads"] = default_index_threads()
    return opts


def _uses_process(args: argparse.Namespace) -> bool:
    return args.sampler_process if args.sampler_process is not None else bool(args.ps)


def neighbour_slots_per_sample(args: argparse.Namespace, rule: SampledRule,
                               world: int = 1) -> float | None:
    """Nearest-class slots per sample of one step of a sampled head with an index: the
    ``--sample-num`` classes less the (global) batch's labels, less the random share, over
    the global batch; the least it can be (every label of the batch distinct). None for the
    full softmax and ``random``. It bounds how many of a sample's hardest negatives a step
    can hold: the selection gives every sample its 1st neighbour, then its 2nd, ..."""
    from ..samplers.selection import neighbour_slots

    if not args.sampled or args.sampler == "random":
        return None
    batch = args.batch_size * max(1, int(world))
    return neighbour_slots(args.sample_num, batch, rule.random_share) / batch


def build_head_from_args(args: argparse.Namespace, num_classes: int,
                         rule: SampledRule | None = None):
    """``(head, row store or None)`` for ``--head`` / ``--sampled``: the full head, or the
    sampled head over a row store (this process's, ``--ps``, or with ``--row-store dist``
    this rank's shard) trained by ``rule``'s SGD, selecting with ``--sampler`` corrected as
    ``rule`` says."""
    from . import FullHead, SampledHead

    kw = logit_kwargs(args)
    if not args.sampled:
        return FullHead(num_classes, args.embedding_size, **kw), None
    if rule is None:
        raise ValueError("the sampled head needs its rule (SampledRule.resolve)")
    world, rank = hd.world_size(), hd.rank()
    if args.sample_num > num_classes:
        raise ValueError(f"--sample-num {args.sample_num} exceeds the {num_classes} classes of "
                         "the data; lower --sample-num")
    global_batch = args.batch_size * world
    if args.sample_num < min(global_batch, num_classes):
        raise ValueError(f"--sample-num {args.sample_num} is smaller than the global batch "
                         f"({args.batch_size} x {world} processes = {global_batch}): "
                         "a batch's own labels alone may not fit; raise --sample-num or lower "
                         "--batch-size")
    if getattr(args, "row_store", "auto") == "dist":
        return _build_dist_head(args, num_classes, rule, kw)
    from ..rowstore import build_row_store
    from ..samplers import build_sampler

    opts = sampler_options(args, rule, rank)
    try:
        sampler = build_sampler(args.sampler, num_classes, args.embedding_size,
                                metric="cosine" if args.head in MARGIN_HEADS else "ip",
                                seed=args.seed, process=_uses_process(args) and rank == 0,
                                **opts)
    except TypeError as exc:  # an option the backend does not take
        if not args.sampler_opt:
            raise
        raise ValueError(f"--sampler-opt {' '.join(args.sampler_opt)}: not an option of the "
                         f"{args.sampler} sampler ({exc}); see hfsoftmax/samplers/README.md "
                         "for each backend's options") from None
    sgd = rule.sgd(lr=args.lr, weight_decay=args.weight_decay)
    store = build_row_store(num_classes, args.embedding_size, sgd, ps=args.ps,
                            table=args.ps_table, timeout_s=args.ps_timeout, seed=args.seed,
                            rank=rank, world=world)
    from ..engine.recipe import resolve_recall_every

    head = SampledHead(store, sampler, args.sample_num, interval=args.interval,
                       recall_every=resolve_recall_every(args, num_classes),
                       logq=HEAD_LOGQ[rule.logq], **kw)
    return head, store


def _build_dist_head(args: argparse.Namespace, num_classes: int, rule: SampledRule,
                     kw: dict[str, Any]):
    """``--row-store dist``: this rank's shard of the rows
    (:class:`~hfsoftmax.rowstore_dist.DistRowStore`), the selection over it
    (:class:`~hfsoftmax.samplers.sharded.ShardSelector`) and the head
    (:class:`~hfsoftmax.heads.dist_sampled.DistSampledHead`). A world of one is one shard."""
    import logging

    from ..engine.config import parse_key_values
    from ..engine.recipe import resolve_recall_every
    from ..rowstore_dist import DistRowStore
    from ..samplers.sharded import ShardSelector
    from .dist_sampled import DistSampledHead

    extra = parse_key_values(args.sampler_opt)
    allowed = {"dtype", "chunk_rows", "neighbour_oversample"}
    if set(extra) - allowed:
        raise ValueError(f"--sampler-opt {', '.join(sorted(set(extra) - allowed))}: not an "
                         f"option of the sharded selection (--row-store dist takes "
                         f"{', '.join(sorted(allowed))})")
    if rule.fresh_rows and getattr(args, "fresh_rows", None):  # given, not the preset's
        logging.getLogger(__name__).info(
            "--row-store dist: fresh_rows=%d has no use (every stepped row is written into "
            "the shard's device copy, which is never stale)", rule.fresh_rows)
    store = DistRowStore(num_classes, args.embedding_size,
                         rule.sgd(lr=args.lr, weight_decay=args.weight_decay), seed=args.seed,
                         name=args.ps_table)
    selector = ShardSelector(num_classes, args.embedding_size, store.start, store.stop,
                             metric="cosine" if args.head in MARGIN_HEADS else "ip",
                             seed=args.seed, interval=args.interval,
                             background=args.background_rebuild,
                             random_share=rule.random_share,
                             nearest=args.sampler != "random", **extra)
    head = DistSampledHead(store, selector, args.sample_num, logq=HEAD_LOGQ[rule.logq],
                           recall_every=resolve_recall_every(args, num_classes), **kw)
    return head, store
