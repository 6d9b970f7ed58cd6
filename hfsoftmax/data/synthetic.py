"""The built-in synthetic face-like dataset and its long-tailed variant, in InsightFace's layout.

Deterministic from a seed (same arguments -> byte-identical files, whatever the number of
worker processes). Identities come in *families* of look-alikes so that hard negatives exist:
a family draws a colour code, colours and a face geometry, and each identity is its family's
parameters plus a small deviation (:mod:`hfsoftmax.data.synthetic_render` renders them), so
identities of one family are each other's nearest classes and a nearest-class sampler finds
harder negatives than a random one. The identity signal lives in large colour regions, so it
survives downsampling and a small CNN learns it in minutes on a CPU.

Class sizes (``size_law``): ``constant`` (the set ``synthetic``: ``images_per_class`` each) or
``powerlaw`` (the set ``longtail``): sizes follow the truncated discrete power law
``P(k) ~ k^-size_alpha`` on ``[min_images, images_per_class]``, as real face sets have many
identities with few images and few with many (:func:`class_sizes`).

Files written to ``out_dir`` follow :mod:`hfsoftmax.data.accuracy_set`: ``train.rec/idx``,
``heldout.rec/idx`` (``heldout_per_class`` other images of every identity, for closed-set
top-1), ``property``, ``<set>.bin`` (verification pairs of identities *not* in training: pair
i is a same pair when i is even; odd pairs are different, from one family when i % 4 == 1 and
from two families when i % 4 == 3) and ``<set>.json`` (parameters, counts, ``class_family``,
``class_size``, ``pair_kind``, timing).

>>> make_synthetic("datasets/data/synthetic", num_classes=2000, images_per_class=20, seed=0)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..fileio import write_json
from .accuracy_set import (check_meta, claim_folder, folder_conflict, pair_images,
                           pair_kind_of_index, prepared_meta, progress_bar, read_meta,
                           files_present, render_set, summary_of, worker_map, write_set)
from .synthetic_render import _LAYOUT, _PAIR, render_identity_images
from .verification import dump_bin

__all__ = ["SyntheticConfig", "make_synthetic", "render_identity_images", "class_sizes",
           "pair_kinds", "rewrite_pairs", "main", "main_longtail"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the rendering changes (<set>.json records it)
GENERATOR = "hfsoftmax.data.synthetic"
_SIZES = 6  # seed-stream tag of the class-size assignment (1..5: synthetic_render)
SIZE_LAWS = ("constant", "powerlaw")
_SIZE_FIELDS = ("size_law", "size_alpha", "min_images")
_MAX_CLASS_SIZE = 100_000  # the power law's support is materialised


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic set (all of them determine the bytes)."""
    num_classes: int = 2000
    images_per_class: int = 20        # powerlaw: the largest class size
    heldout_per_class: int = 2
    family_size: int = 10
    num_pairs: int = 1000
    seed: int = 0
    identity_deviation: float = 0.18  # std of an identity's colour-code offset from its family
    noise: float = 6.0                # max std of pixel noise (0..255 scale)
    size_law: str = "constant"        # "constant" or "powerlaw" (see class_sizes)
    size_alpha: float = 2.0           # powerlaw: P(k) ~ k^-size_alpha
    min_images: int = 2               # powerlaw: the smallest class size

    def validate(self) -> None:
        for name in ("num_classes", "images_per_class", "family_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_per_class < 0:
            raise ValueError(f"heldout_per_class must be >= 0, got {self.heldout_per_class}")
        if self.num_pairs < 0 or self.num_pairs % 2:
            raise ValueError(f"num_pairs must be even and >= 0 (half same, half different), "
                             f"got {self.num_pairs}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.size_law not in SIZE_LAWS:
            raise ValueError(f"Invalid size_law {self.size_law!r}. Only {SIZE_LAWS} exist")
        d = SyntheticConfig()
        if self.size_law == "constant" and (self.size_alpha, self.min_images) != (
                d.size_alpha, d.min_images):
            raise ValueError("size_alpha and min_images apply to size_law='powerlaw' only "
                             f"(got size_alpha={self.size_alpha}, min_images={self.min_images} "
                             "with 'constant')")
        if self.size_law == "powerlaw":
            if self.images_per_class > _MAX_CLASS_SIZE:
                raise ValueError(f"images_per_class (the largest class) must be <= "
                                 f"{_MAX_CLASS_SIZE}, got {self.images_per_class}")
            if not 1 <= self.min_images <= self.images_per_class:
                raise ValueError(f"min_images must lie in [1, images_per_class="
                                 f"{self.images_per_class}], got {self.min_images}")
            if not 0 < self.size_alpha <= 10:
                raise ValueError(f"size_alpha must lie in (0, 10], got {self.size_alpha}")


def set_name(cfg: SyntheticConfig) -> str:
    """``synthetic`` for constant class sizes, ``longtail`` for the power law."""
    return "synthetic" if cfg.size_law == "constant" else "longtail"


def config_dict(cfg: SyntheticConfig) -> dict:
    """The parameters as recorded in ``<set>.json``; a constant-size set leaves the size-law
    fields out, so its record is the one sets made before they existed carry."""
    d = asdict(cfg)
    if cfg.size_law == "constant":
        for k in _SIZE_FIELDS:
            d.pop(k)
    return d


# -- layout -------------------------------------------------------------------------------------

def size_law_pmf(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Class sizes k and their probabilities under ``cfg``'s power law."""
    k = np.arange(cfg.min_images, cfg.images_per_class + 1)
    p = k.astype(np.float64) ** -cfg.size_alpha
    return k, p / p.sum()


def class_sizes(cfg: SyntheticConfig) -> np.ndarray:
    """Training images of each class.

    ``constant``: ``images_per_class`` each. ``powerlaw``: a stratified draw from the
    truncated discrete power law (:func:`size_law_pmf`): the sizes at the C quantiles
    ``(i + 0.5) / C`` of its CDF, so each size's count is within one of ``C * P(k)`` (no
    sampling noise between seeds), then a seeded permutation assigns them to classes,
    independently of the families.
    """
    C = cfg.num_classes
    if cfg.size_law == "constant":
        return np.full(C, cfg.images_per_class, dtype=np.int64)
    k, p = size_law_pmf(cfg)
    cdf = np.cumsum(p)
    idx = np.searchsorted(cdf, (np.arange(C) + 0.5) / C, side="right")
    sizes = k[np.minimum(idx, k.size - 1)]
    return np.random.default_rng([cfg.seed, _SIZES]).permutation(sizes).astype(np.int64)


def class_families(cfg: SyntheticConfig) -> np.ndarray:
    """Family id of each training class: a seeded shuffle of ``class // family_size``, so
    look-alikes do not sit at adjacent class ids."""
    fam = np.arange(cfg.num_classes) // cfg.family_size
    return np.random.default_rng([cfg.seed, _LAYOUT]).permutation(fam)


def _num_train_families(cfg: SyntheticConfig) -> int:
    return (cfg.num_classes + cfg.family_size - 1) // cfg.family_size


def _pair_spec(cfg: SyntheticConfig, i: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(family, class) of both images of verification pair i; held-out identities only.

    Held-out families are numbered after the training ones and their identities after the
    training classes, so none of them occurs in train.rec. i even: same identity; i % 4 == 1:
    two identities of one family (hard); i % 4 == 3: identities of two families.
    """
    fs = cfg.family_size
    n_fam = max(2, math.ceil(cfg.num_pairs / 20))  # ~10 pairs per held-out family
    f0 = _num_train_families(cfg)
    r = np.random.default_rng([cfg.seed, _PAIR, i])
    fa = int(r.integers(n_fam))
    ia = int(r.integers(fs))
    if i % 2 == 0:
        fb, ib = fa, ia
    elif i % 4 == 1 and fs > 1:
        fb, ib = fa, int((ia + 1 + r.integers(fs - 1)) % fs)
    else:
        fb, ib = int((fa + 1 + r.integers(n_fam - 1)) % n_fam), int(r.integers(fs))
    cls = lambda f, k: cfg.num_classes + f * fs + k  # noqa: E731
    return (f0 + fa, cls(fa, ia)), (f0 + fb, cls(fb, ib))


def pair_kinds(cfg: SyntheticConfig, num_pairs: int | None = None) -> list[str]:
    """The kind of each verification pair (:func:`_pair_spec`'s rule): with families of one
    identity, the look-alike slots hold pairs from two families."""
    n = cfg.num_pairs if num_pairs is None else num_pairs
    kinds = [pair_kind_of_index(i) for i in range(n)]
    return kinds if cfg.family_size > 1 else [k.replace("lookalike", "other") for k in kinds]


def _render_classes(task):
    cfg, classes, families, sizes = task
    return [render_identity_images(cfg, int(f), int(c), int(n) + cfg.heldout_per_class)
            for c, f, n in zip(classes, families, sizes)]


def _render_pairs(task):
    cfg, pairs = task
    out = []
    for i in pairs:
        (fa, ca), (fb, cb) = _pair_spec(cfg, i)
        # stream 1+i: images of a held-out identity differ from pair to pair
        a = render_identity_images(cfg, fa, ca, 1, stream=1 + 2 * i)[0]
        b = render_identity_images(cfg, fb, cb, 1, stream=2 + 2 * i)[0]
        out.append((a, b))
    return out


def _pair_tasks(cfg: SyntheticConfig) -> list:
    """:func:`_render_pairs`'s tasks for all ``cfg.num_pairs`` verification pairs, 50 each."""
    chunk = 50
    return [(cfg, list(range(s, min(cfg.num_pairs, s + chunk))))
            for s in range(0, cfg.num_pairs, chunk)]


def rewrite_pairs(out_dir: str | os.PathLike, num_pairs: int, *, workers: int | None = None,
                  progress: bool = False) -> dict:
    """Replace the verification pairs of a prepared set (``<set>.bin``) by ``num_pairs``
    pairs; the training and held-out records stay as they are (their bytes do not depend on
    the pairs), so a set gets more pairs without rendering its identities again.

    Pairs are drawn as :func:`make_synthetic` would for ``num_pairs``: the same bytes as a
    set made with that count from the start. Returns the updated summary (``<set>.json``).
    """
    out_dir = os.fspath(out_dir)
    metas = {k: v for k, v in read_meta(out_dir).items() if k in ("synthetic", "longtail")}
    if not metas:
        raise ValueError(f"{out_dir} holds no prepared synthetic set (no synthetic.json or "
                         "longtail.json); prepare it with datasets/prepare_synthetic.py or "
                         "datasets/prepare_longtail.py first")
    name, meta = next(iter(metas.items()))
    path = os.path.join(out_dir, f"{name}.json")
    cfg = SyntheticConfig(**dict(meta["config"], num_pairs=num_pairs))
    cfg.validate()
    workers = max(1, workers or os.cpu_count() or 1)
    t0 = time.perf_counter()
    bar = progress_bar(progress, 2 * num_pairs, "pairs")
    try:
        with worker_map(workers) as imap:
            bins = pair_images(imap, _render_pairs, _pair_tasks(cfg), bar)
    finally:
        if bar is not None:
            bar.close()
    # <set>.json first says "pairs being rewritten" (some pair count, -1), so a crash between
    # the two writes leaves a set that matches no count exactly and gets its pairs rewritten
    write_json(path, dict(meta, complete=False, stage="pairs",
                          config=dict(meta["config"], num_pairs=-1)))
    kinds = pair_kinds(cfg)
    dump_bin(os.path.join(out_dir, meta.get("bin") or f"{name}.bin"), bins,
             [k == "same" for k in kinds])
    meta = dict(meta, complete=True, config=config_dict(cfg), pairs=num_pairs,
                same_pairs=kinds.count("same"), pair_kind=kinds,
                pairs_rewritten_s=round(time.perf_counter() - t0, 3))
    meta.pop("stage", None)
    if "set" not in meta:  # a synthetic.json made before the accuracy-set contract
        meta.update(set=name, generator=GENERATOR, bin=f"{name}.bin", num_classes=cfg.num_classes,
                    class_size=class_sizes(cfg).tolist())
    check_meta(meta, path)
    write_json(path, meta)
    logger.info("%s: %d verification pairs written in %.1f s (training records kept)", out_dir,
                num_pairs, time.perf_counter() - t0)
    return summary_of(meta)


def make_synthetic(out_dir: str | os.PathLike, num_classes: int = 2000,
                   images_per_class: int = 20, seed: int = 0, *, heldout_per_class: int = 2,
                   family_size: int = 10, num_pairs: int = 1000, workers: int | None = None,
                   progress: bool = False, force: bool = False, **opts) -> dict:
    """Write the synthetic set to ``out_dir`` (see the module docstring); returns the summary
    also written to ``<set>.json`` (counts, parameters, seconds taken, images/s).

    ``workers`` processes render identities in parallel (default: all cores); the bytes do
    not depend on it. ``opts``: ``identity_deviation``, ``noise`` and the size law
    (``size_law``, ``size_alpha``, ``min_images``). A folder holding another set is refused
    unless ``force`` (:func:`~.accuracy_set.claim_folder`).
    """
    cfg = SyntheticConfig(num_classes=num_classes, images_per_class=images_per_class,
                          heldout_per_class=heldout_per_class, family_size=family_size,
                          num_pairs=num_pairs, seed=seed, **opts)
    cfg.validate()
    out_dir, name = os.fspath(out_dir), set_name(cfg)
    claim_folder(out_dir, name, GENERATOR, config_dict(cfg), force=force)
    workers = max(1, workers or os.cpu_count() or 1)
    t0 = time.perf_counter()
    C, H = cfg.num_classes, cfg.heldout_per_class
    fams, sizes = class_families(cfg), class_sizes(cfg)
    chunk = max(1, min(64, C // (4 * workers) or 1))
    tasks = [(cfg, list(range(s, min(C, s + chunk))), fams[s:s + chunk].tolist(),
              sizes[s:s + chunk].tolist()) for s in range(0, C, chunk)]
    n_images = int(sizes.sum()) + C * H + 2 * cfg.num_pairs
    bins = render_set(out_dir, sizes, H, workers, _render_classes, tasks, _render_pairs,
                      _pair_tasks(cfg), progress_bar(progress, n_images, name))
    seconds = time.perf_counter() - t0
    kinds = pair_kinds(cfg)
    meta = {
        "set": name, "generator": GENERATOR, "format_version": FORMAT_VERSION,
        "config": config_dict(cfg), "workers": workers, "num_classes": C,
        "train_images": int(sizes.sum()), "heldout_images": C * H, "pairs": cfg.num_pairs,
        "same_pairs": kinds.count("same"), "families": _num_train_families(cfg),
        "bin": f"{name}.bin", "class_size_min": int(sizes.min()),
        "class_size_max": int(sizes.max()), "class_size_mean": round(float(sizes.mean()), 3),
        "seconds": round(seconds, 3), "images_per_s": round(n_images / seconds, 1),
        "class_family": fams.tolist(), "class_size": sizes.tolist(), "pair_kind": kinds,
    }
    write_set(out_dir, meta, bins)
    logger.info("%s set: %d classes, %d training images (+%d held out) and %d pairs written to "
                "%s in %.1f s (%.0f images/s, %d workers)", name, C, int(sizes.sum()), C * H,
                cfg.num_pairs, out_dir, seconds, n_images / seconds, workers)
    return summary_of(meta)


def _already_prepared(out_dir: str, cfg: SyntheticConfig, *, but_pairs: bool = False) -> bool:
    """Whether ``out_dir`` holds the set of ``cfg`` (``but_pairs``: in all but the number of
    verification pairs, or with its pairs being rewritten)."""
    want = config_dict(cfg)
    if not but_pairs:
        return prepared_meta(out_dir, set_name(cfg), FORMAT_VERSION, want,
                             heldout=cfg.heldout_per_class > 0) is not None
    meta = read_meta(out_dir).get(set_name(cfg))
    if meta is None or not (meta.get("complete", True) is True or meta.get("stage") == "pairs"):
        return False
    got = dict(meta.get("config") or {}, num_pairs=want["num_pairs"])
    return (meta.get("format_version") == FORMAT_VERSION and got == want
            and files_present(out_dir, meta, set_name(cfg), cfg.heldout_per_class > 0))


def _parser(longtail: bool) -> argparse.ArgumentParser:
    d = LONGTAIL_DEFAULTS if longtail else SyntheticConfig()
    name = set_name(d)
    ap = argparse.ArgumentParser(description=(
        "Write the " + ("long-tailed synthetic" if longtail else "built-in synthetic face-like")
        + f" dataset in InsightFace's layout (train.rec/idx, property, heldout.rec/idx, "
        f"{name}.bin, {name}.json); see datasets/README.md."))
    ap.add_argument("--out", default=f"datasets/data/{name}", help="output folder")
    ap.add_argument("--num-classes", type=int, default=d.num_classes)
    if longtail:
        ap.add_argument("--max-images", dest="images_per_class", type=int,
                        default=d.images_per_class, help="the largest class size")
        ap.add_argument("--min-images", type=int, default=d.min_images,
                        help="the smallest class size")
        ap.add_argument("--size-alpha", type=float, default=d.size_alpha,
                        help="power-law exponent: P(k) ~ k^-alpha")
    else:
        ap.add_argument("--images-per-class", type=int, default=d.images_per_class)
    ap.add_argument("--heldout-per-class", type=int, default=d.heldout_per_class)
    ap.add_argument("--family-size", type=int, default=d.family_size,
                    help="identities per family of look-alikes")
    ap.add_argument("--pairs", type=int, default=d.num_pairs,
                    help=f"verification pairs in {name}.bin (even; half same)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--identity-deviation", type=float, default=d.identity_deviation)
    ap.add_argument("--noise", type=float, default=d.noise)
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--force", action="store_true", help="rewrite even if the folder already "
                    "holds this exact set; replace a folder holding another set")
    ap.add_argument("--no-progress", action="store_true")
    return ap


LONGTAIL_DEFAULTS = SyntheticConfig(num_classes=5000, images_per_class=50, size_law="powerlaw",
                                    size_alpha=2.0, min_images=2)


def _main(argv: list[str] | None, longtail: bool) -> dict:
    ap = _parser(longtail)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    size = (dict(size_law="powerlaw", size_alpha=args.size_alpha, min_images=args.min_images)
            if longtail else {})
    cfg = SyntheticConfig(args.num_classes, args.images_per_class, args.heldout_per_class,
                          args.family_size, args.pairs, args.seed, args.identity_deviation,
                          args.noise, **size)
    try:
        cfg.validate()
    except ValueError as e:
        ap.error(str(e))
    name = set_name(cfg)
    conflict = folder_conflict(args.out, name)
    if conflict and not args.force:
        ap.error(conflict)
    if not args.force and _already_prepared(args.out, cfg):
        logger.info("%s already holds this %s set (%s.json matches); use --force to rewrite",
                    args.out, name, name)
        meta = summary_of(read_meta(args.out)[name])
        print(json.dumps(meta))
        return meta
    if not args.force and _already_prepared(args.out, cfg, but_pairs=True):
        logger.info("%s holds this %s set with other verification pairs: rewriting %s.bin only",
                    args.out, name, name)
        summary = rewrite_pairs(args.out, cfg.num_pairs, workers=args.workers,
                                progress=not args.no_progress)
        print(json.dumps(summary))
        return summary
    opts = {k: v for k, v in config_dict(cfg).items()
            if k in ("identity_deviation", "noise") + _SIZE_FIELDS}
    summary = make_synthetic(args.out, cfg.num_classes, cfg.images_per_class, cfg.seed,
                             heldout_per_class=cfg.heldout_per_class,
                             family_size=cfg.family_size, num_pairs=cfg.num_pairs,
                             workers=args.workers, progress=not args.no_progress,
                             force=args.force, **opts)
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Command line of ``datasets/prepare_synthetic.py`` (constant class sizes)."""
    return _main(argv, longtail=False)


def main_longtail(argv: list[str] | None = None) -> dict:
    """Command line of ``datasets/prepare_longtail.py`` (power-law class sizes)."""
    return _main(argv, longtail=True)
