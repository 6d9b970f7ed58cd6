"""The built-in synthetic face-like dataset, written in InsightFace's layout.

Deterministic from a seed (same arguments -> byte-identical files, whatever the number of
worker processes). Identities come in *families* of look-alikes so that hard negatives exist:

- a family draws a coarse 4x4 colour code for the face region, skin/hair/background colours
  and a face geometry (face ellipse, hairline, eyes, mouth);
- an identity is its family's parameters plus a small identity-specific deviation (colour
  code, skin, hair, eye spacing/height, mouth width), so identities of one family are each
  other's nearest classes and a nearest-class sampler finds harder negatives than a random
  one;
- each image is the identity's template under a random pose (rotation, scale, shift),
  illumination (gain per channel, a linear light gradient) and pixel noise, JPEG-encoded at a
  fixed quality (no timestamps or metadata, so bytes are reproducible).

The identity signal lives in large colour regions, so it survives downsampling and a small
CNN learns it in minutes on a CPU.

Files written to ``out_dir``: ``train.rec``/``train.idx`` (K images per identity),
``heldout.rec``/``heldout.idx`` (other images of the same identities, for closed-set top-1),
``property`` (``num_classes,112,112``), ``synthetic.bin`` (verification pairs of identities
*not* in training, in the Python-2 pickle layout of InsightFace's ``lfw.bin``: pair i is a
same pair when i is even; odd pairs are different, alternately from one family and from two
families) and ``synthetic.json`` (parameters, counts, each class's family, timing).

>>> make_synthetic("datasets/data/synthetic", num_classes=2000, images_per_class=20, seed=0)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..fileio import write_json, write_text

from .recordio import IRHeader, RecordIOWriter, pack
from .synthetic_render import _LAYOUT, _PAIR, SIZE, render_identity_images
from .verification import dump_bin

__all__ = ["SyntheticConfig", "make_synthetic", "render_identity_images", "main"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the rendering changes (synthetic.json records it)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic set (all of them determine the bytes)."""
    num_classes: int = 2000
    images_per_class: int = 20
    heldout_per_class: int = 2
    family_size: int = 10
    num_pairs: int = 1000
    seed: int = 0
    identity_deviation: float = 0.18  # std of an identity's colour-code offset from its family
    noise: float = 6.0                # max std of pixel noise (0..255 scale)

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


# -- layout -------------------------------------------------------------------------------------

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


def _render_classes(task):
    cfg, classes, families = task
    n = cfg.images_per_class + cfg.heldout_per_class
    return [render_identity_images(cfg, int(f), int(c), n) for c, f in zip(classes, families)]


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


def _render_all_pairs(cfg: SyntheticConfig, imap, bar=None) -> tuple[list, list]:
    """Images and same/different flags of all ``cfg.num_pairs`` verification pairs."""
    chunk = 50
    tasks = [(cfg, list(range(s, min(cfg.num_pairs, s + chunk))))
             for s in range(0, cfg.num_pairs, chunk)]
    bins, issame = [], []
    for result in imap(_render_pairs, tasks):
        for a, b in result:
            bins += [a, b]
            issame.append(len(issame) % 2 == 0)
        if bar is not None:
            bar.update(2 * len(result))
    return bins, issame


def rewrite_pairs(out_dir: str | os.PathLike, num_pairs: int, *, workers: int | None = None,
                  progress: bool = False) -> dict:
    """Replace the verification pairs of a prepared set (``synthetic.bin``) by ``num_pairs``
    pairs; the training and held-out records stay as they are (their bytes do not depend on
    the pairs), so a set gets more pairs without rendering its identities again.

    Pairs are drawn as :func:`make_synthetic` would for ``num_pairs``: the same bytes as a
    set made with that count from the start. Returns the updated summary (``synthetic.json``).
    """
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, "synthetic.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{out_dir} holds no prepared synthetic set ({path}: {e}); prepare it "
                         "with datasets/prepare_synthetic.py first") from None
    cfg = SyntheticConfig(**dict(meta["config"], num_pairs=num_pairs))
    cfg.validate()
    workers = max(1, workers or os.cpu_count() or 1)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=2 * num_pairs, unit="img", desc="pairs")
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        bins, issame = _render_all_pairs(cfg, pool.imap if pool is not None else map, bar)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    # synthetic.json first says "some pairs count" (-1), so a crash between the two writes
    # leaves a set that matches no count exactly and gets its pairs rewritten again
    write_json(path, dict(meta, config=dict(meta["config"], num_pairs=-1)))
    dump_bin(os.path.join(out_dir, "synthetic.bin"), bins, issame)
    meta.update(config=asdict(cfg), pairs=num_pairs, same_pairs=sum(issame),
                pairs_rewritten_s=round(time.perf_counter() - t0, 3))
    write_json(path, meta)
    logger.info("%s: %d verification pairs written in %.1f s (training records kept)", out_dir,
                num_pairs, time.perf_counter() - t0)
    return {k: v for k, v in meta.items() if k != "class_family"}


def make_synthetic(out_dir: str | os.PathLike, num_classes: int = 2000,
                   images_per_class: int = 20, seed: int = 0, *, heldout_per_class: int = 2,
                   family_size: int = 10, num_pairs: int = 1000, workers: int | None = None,
                   progress: bool = False, **render_opts) -> dict:
    """Write the synthetic set to ``out_dir`` (see the module docstring); returns the summary
    also written to ``synthetic.json`` (counts, parameters, seconds taken, images/s).

    ``workers`` processes render identities in parallel (default: all cores); the bytes do
    not depend on it. ``render_opts``: ``identity_deviation``, ``noise``.
    """
    cfg = SyntheticConfig(num_classes=num_classes, images_per_class=images_per_class,
                          heldout_per_class=heldout_per_class, family_size=family_size,
                          num_pairs=num_pairs, seed=seed, **render_opts)
    cfg.validate()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    t0 = time.perf_counter()
    C, K, H = cfg.num_classes, cfg.images_per_class, cfg.heldout_per_class
    fams = class_families(cfg)
    chunk = max(1, min(64, C // (4 * workers) or 1))
    tasks = [(cfg, list(range(s, min(C, s + chunk))), fams[s:s + chunk].tolist())
             for s in range(0, C, chunk)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=C * (K + H) + 2 * cfg.num_pairs, unit="img", desc="synthetic")

    def _open(name, per_class):
        w = RecordIOWriter(os.path.join(out_dir, f"{name}.rec"),
                           os.path.join(out_dir, f"{name}.idx"))
        first = C * per_class + 1
        w.write_idx(0, pack(IRHeader(2, [first, first + C], 0, 0), b""))
        return w

    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    imap = pool.imap if pool is not None else map
    train = _open("train", K)
    held = _open("heldout", H) if H else None
    try:
        cls = 0
        for result in imap(_render_classes, tasks):
            for images in result:
                for k in range(K):
                    key = 1 + cls * K + k
                    train.write_idx(key, pack(IRHeader(0, float(cls), key, 0), images[k]))
                for k in range(H):
                    key = 1 + cls * H + k
                    held.write_idx(key, pack(IRHeader(0, float(cls), key, 0), images[K + k]))
                cls += 1
                if bar is not None:
                    bar.update(K + H)
        for w, per in ((train, K), (held, H)):
            if w is None:
                continue
            first = C * per + 1
            for c in range(C):  # identity records: label = [a, b) of the class's images
                a = 1 + c * per
                w.write_idx(first + c, pack(IRHeader(2, [a, a + per], 0, 0), b""))
        bins, issame = _render_all_pairs(cfg, imap, bar)
    except BaseException:
        train.abort()
        if held is not None:
            held.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    train.close()
    if held is not None:
        held.close()
    dump_bin(os.path.join(out_dir, "synthetic.bin"), bins, issame)
    write_text(os.path.join(out_dir, "property"), f"{C},{SIZE},{SIZE}")
    seconds = time.perf_counter() - t0
    n_images = C * (K + H) + 2 * cfg.num_pairs
    summary = {
        "format_version": FORMAT_VERSION, "config": asdict(cfg), "workers": workers,
        "train_images": C * K, "heldout_images": C * H, "pairs": cfg.num_pairs,
        "same_pairs": sum(issame), "families": _num_train_families(cfg),
        "seconds": round(seconds, 3), "images_per_s": round(n_images / seconds, 1),
    }
    meta = dict(summary, class_family=fams.tolist())
    write_json(os.path.join(out_dir, "synthetic.json"), meta)
    logger.info("synthetic set: %d classes x %d images (+%d held out) and %d pairs written to "
                "%s in %.1f s (%.0f images/s, %d workers)", C, K, H, cfg.num_pairs, out_dir,
                seconds, n_images / seconds, workers)
    return summary


def _already_prepared(out_dir: str, cfg: SyntheticConfig, *, but_pairs: bool = False) -> bool:
    """Whether ``out_dir`` holds the set of ``cfg`` (``but_pairs``: in all but the number of
    verification pairs)."""
    path = os.path.join(out_dir, "synthetic.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    needed = ["train.rec", "train.idx", "property", "synthetic.bin"]
    if cfg.heldout_per_class:
        needed += ["heldout.rec", "heldout.idx"]
    want, got = asdict(cfg), dict(meta.get("config") or {})
    if but_pairs:
        got["num_pairs"] = want["num_pairs"]
    return (meta.get("format_version") == FORMAT_VERSION and got == want
            and all(os.path.isfile(os.path.join(out_dir, n)) for n in needed))


def main(argv: list[str] | None = None) -> dict:
    """Command line of ``datasets/prepare_synthetic.py``."""
    d = SyntheticConfig()
    ap = argparse.ArgumentParser(description="Write the built-in synthetic face-like dataset in "
                                 "InsightFace's layout (train.rec/idx, property, heldout.rec/"
                                 "idx, synthetic.bin).")
    ap.add_argument("--out", default="datasets/data/synthetic", help="output folder")
    ap.add_argument("--num-classes", type=int, default=d.num_classes)
    ap.add_argument("--images-per-class", type=int, default=d.images_per_class)
    ap.add_argument("--heldout-per-class", type=int, default=d.heldout_per_class)
    ap.add_argument("--family-size", type=int, default=d.family_size,
                    help="identities per family of look-alikes")
    ap.add_argument("--pairs", type=int, default=d.num_pairs,
                    help="verification pairs in synthetic.bin (even; half same)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--identity-deviation", type=float, default=d.identity_deviation)
    ap.add_argument("--noise", type=float, default=d.noise)
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--force", action="store_true",
                    help="rewrite even if the folder already holds this exact set")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = SyntheticConfig(args.num_classes, args.images_per_class, args.heldout_per_class,
                          args.family_size, args.pairs, args.seed, args.identity_deviation,
                          args.noise)
    try:
        cfg.validate()
    except ValueError as e:
        ap.error(str(e))
    if not args.force and _already_prepared(args.out, cfg):
        logger.info("%s already holds this synthetic set (synthetic.json matches); use --force "
                    "to rewrite", args.out)
        with open(os.path.join(args.out, "synthetic.json"), encoding="utf-8") as f:
            meta = json.load(f)
        meta.pop("class_family", None)
        print(json.dumps(meta))
        return meta
    if not args.force and _already_prepared(args.out, cfg, but_pairs=True):
        logger.info("%s holds this synthetic set with other verification pairs: rewriting "
                    "synthetic.bin only", args.out)
        summary = rewrite_pairs(args.out, cfg.num_pairs, workers=args.workers,
                                progress=not args.no_progress)
        print(json.dumps(summary))
        return summary
    summary = make_synthetic(args.out, cfg.num_classes, cfg.images_per_class, cfg.seed,
                             heldout_per_class=cfg.heldout_per_class,
                             family_size=cfg.family_size, num_pairs=cfg.num_pairs,
                             workers=args.workers, progress=not args.no_progress,
                             identity_deviation=cfg.identity_deviation, noise=cfg.noise)
    print(json.dumps(summary))
    return summary
