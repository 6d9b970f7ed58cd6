#!/usr/bin/env python
"""How closely a sampled softmax follows the full one, per sample, on a trained model.

For training images of a trained run (any checkpoint of ``hfsoftmax.train``: the full head's
weight or the sampled head's row snapshot), each batch's classes are selected by the real
selection code (``samplers``: the batch's labels, the nearest classes of its features,
random classes) and the sampled loss and its gradient with respect to each feature are
compared with the full softmax's over all rows:

- ``loss_minus_full_mean`` / ``_std``: the sampled loss minus the full loss (nats). Without
  a correction it is always below (the normaliser misses the classes left out).
- ``grad_cos_median`` / ``_mean``: cosine between the sampled and the full gradient of a
  feature (direction).
- ``grad_norm_ratio_median``: their norms' ratio (below 1: the feature's pull toward its
  own row fades sooner than under the full softmax).

for each ``--sample-nums`` x ``--random-shares`` and each correction: ``plain`` (none),
``random`` (``--logq random``: the random top-up stands for the classes left out; only
with a random share) and ``sample`` (``--logq sample``: every selected class but a
sample's label and own neighbours does). The neighbours are exact (an ``exact`` sampler over
the trained rows, searched with the trainer's neighbour count): an index's best case, so the
figures isolate the selection's size and the correction from the index's recall.

    python benchmarks/sampled_fidelity.py --checkpoint runs/x/cosface_annoy/last.pth \\
        --sample-nums 200 400 1000 --out fidelity.json

prints one JSON object (also written to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

logger = logging.getLogger("sampled_fidelity")

CORRECTIONS = ("plain", "random", "sample")


def per_sample_loss_and_grad(spec, features: torch.Tensor, weight: torch.Tensor,
                             target: torch.Tensor, offsets: torch.Tensor | None = None):
    """Per-sample cross-entropy of ``spec``'s logits (+ ``offsets`` in the loss) and its
    gradient with respect to each feature: ``(loss (B,), grad (B, D))``."""
    f = features.detach().clone().requires_grad_(True)
    logits = spec(f, weight, target)
    if offsets is not None:
        logits = logits + offsets
    loss = F.cross_entropy(logits, target, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), f)   # samples are independent: per-sample grads
    return loss.detach(), grad


def fidelity(features: np.ndarray, labels: np.ndarray, rows: np.ndarray, spec,
             sample_num: int, batch_size: int, random_share: float = 0.0,
             seed: int = 0) -> dict:
    """The figures of the module docstring for one ``sample_num`` and ``random_share``:
    ``{correction: {figure: value}}`` over ``features`` taken ``batch_size`` at a time."""
    from hfsoftmax.samplers import build_sampler
    from hfsoftmax.samplers.selection import sample_log_weights

    n, d = rows.shape
    sampler = build_sampler("exact", n, d, metric="cosine" if spec.normalized else "ip",
                            seed=seed, background=False, random_share=random_share)
    sampler.rebuild(rows)
    w = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    x_all = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    modes = [c for c in CORRECTIONS if c != "random" or random_share > 0]
    acc = {c: {"dl": [], "cos": [], "ratio": []} for c in modes}
    for s in range(0, len(y_all) - batch_size + 1, batch_size):
        x, y = x_all[s:s + batch_size], y_all[s:s + batch_size]
        full_loss, full_grad = per_sample_loss_and_grad(spec, x, w, y)
        state = sampler.rng.bit_generator.state
        ids, target, off = sampler.select(x, y, sample_num, log_weights=True)
        sampler.rng.bit_generator.state = state          # the same selection again
        ids2, _, own = sampler.select(x, y, sample_num, log_weights="sample")
        assert torch.equal(ids, ids2)
        offsets = {"plain": None, "random": off[None, :],
                   "sample": sample_log_weights(own, sample_num, n)}
        for c in modes:
            loss, grad = per_sample_loss_and_grad(spec, x, w[ids], target, offsets[c])
            fg = full_grad.norm(dim=1)
            acc[c]["dl"].append(loss - full_loss)
            acc[c]["cos"].append(F.cosine_similarity(grad, full_grad, dim=1, eps=1e-12))
            acc[c]["ratio"].append(grad.norm(dim=1) / fg.clamp_min(1e-12))
    out = {}
    for c in modes:
        dl, cos, ratio = (torch.cat(acc[c][k]).double() for k in ("dl", "cos", "ratio"))
        out[c] = {"loss_minus_full_mean": round(float(dl.mean()), 4),
                  "loss_minus_full_std": round(float(dl.std()), 4),
                  "grad_cos_median": round(float(cos.median()), 4),
                  "grad_cos_mean": round(float(cos.mean()), 4),
                  "grad_norm_ratio_median": round(float(ratio.median()), 4)}
    return out


def training_features(checkpoint: str, data: str, images: int, seed: int):
    """Features (no flip: as the head sees them in training, without augmentation) and labels
    of ``images`` training images drawn at random, the checkpoint's settings and the set's
    class count."""
    from accuracy_eval import embed_images  # benchmarks/: the images' embeddings and labels

    from hfsoftmax.data.insightface import InsightFaceRecDataset
    from hfsoftmax.extract import load_backbone, load_checkpoint_args

    _, args = load_checkpoint_args(checkpoint)
    ds = InsightFaceRecDataset(data or args["train_rec"], split="train")
    if images > len(ds):
        raise ValueError(f"--images {images} exceeds the {len(ds)} training images of "
                         f"{data or args['train_rec']}; lower --images")
    idx = np.random.default_rng(seed).choice(len(ds), size=images, replace=False)
    feats, labels = embed_images(load_backbone(checkpoint, "cpu"), ds, idx, flip=False)
    return feats, labels, args, ds.num_classes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trainer checkpoint (last.pth)")
    p.add_argument("--data", default=None,
                   help="the training set's folder (default: the checkpoint's --train-rec)")
    p.add_argument("--images", type=int, default=1920, help="training images scored")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per selection (default: the checkpoint's batch size)")
    p.add_argument("--sample-nums", type=int, nargs="+", required=True)
    p.add_argument("--random-shares", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    from accuracy_eval import class_rows  # benchmarks/: the trained rows, full or sampled head

    from hfsoftmax.fileio import write_json
    from hfsoftmax.heads.logits import LogitSpec

    feats, labels, args, num_classes = training_features(a.checkpoint, a.data, a.images, a.seed)
    rows = class_rows(a.checkpoint, "sampled" if args.get("sampled") else "full", num_classes,
                      feats.shape[1])
    if args.get("head", "linear") == "linear":
        spec = LogitSpec("linear")
    else:
        spec = LogitSpec(args["head"], float(args["scale"]), float(args["margin"]))
    bs = a.batch_size or int(args["batch_size"])
    for sn in a.sample_nums:
        if not bs <= sn <= rows.shape[0]:
            p.error(f"--sample-nums {sn}: must be in [batch size {bs}, {rows.shape[0]} classes]")
    results = {}
    for sn in a.sample_nums:
        for share in a.random_shares:
            key = f"sample_num={sn}/random_share={share}"
            results[key] = fidelity(feats, labels, rows, spec, sn, bs, share, a.seed)
            logger.info("%s: %s", key, results[key])
    out = {"benchmark": "sampled_fidelity", "checkpoint": a.checkpoint,
           "trained_with": {k: args.get(k) for k in (
               "head", "scale", "margin", "sampled", "sampler", "sample_num", "random_share",
               "logq_correction", "logq_per_sample", "max_steps", "seed")},
           "config": {"images": a.images, "batch_size": bs, "num_classes": int(rows.shape[0]),
                      "seed": a.seed, "neighbours": "exact"},
           "results": results}
    print(write_json(a.out, out, indent=1) if a.out else json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
