"""The Hangul glyph set: rendered Hangul syllables as classes, in the accuracy-set layout.

The 11,172 precomposed syllables are ``U+AC00 + (initial * 21 + medial) * 28 + final``
(19 initial, 21 medial, 28 final jamo, final 0 = none). Two syllables are *look-alikes* when
they share exactly two of their three jamo (e.g. 각/간: one final apart; 각/긱: one medial
apart), a structure fixed by the script, independent of any model. A syllable has 65
look-alikes (18 + 20 + 27).

- Split: a seeded permutation of all syllables; its first ``num_verify_classes`` are the
  verification syllables (never trained on), the next ``num_classes`` the training classes
  (class order = permutation order, so look-alikes do not sit at adjacent ids). Smaller
  training sets are prefixes of larger ones, with the same verification syllables.
- Training images: ``images_per_class`` per class, then ``heldout_per_class`` other images of
  the same classes (``heldout.rec``, closed-set top-1); each image a random font and
  augmentation (:mod:`hfsoftmax.data.hangul_render`).
- Family of a training class (diagnostics): its initial and medial, ``initial * 21 +
  medial`` (its members differ in their final: look-alikes of each other).
- Verification pairs (``hangul.bin``), verification syllables only, pair i of kind
  :func:`~.accuracy_set.pair_kind_of_index`: same (two images of one syllable), lookalike
  (two syllables sharing exactly two jamo), other (two syllables sharing at most one).

Written as :mod:`hfsoftmax.data.accuracy_set` defines, plus ``class_syllable``,
``pair_syllables``, the fonts (file, size, sha256) and the library versions in ``hangul.json``.

>>> make_hangul("datasets/data/hangul", num_classes=10000, images_per_class=4, seed=0)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from .accuracy_set import (claim_folder, folder_conflict, pair_kind_of_index, prepared_meta,
                           progress_bar, read_meta, render_set, summary_of, write_set)
from .hangul_render import find_fonts, font_records, render_syllable, versions

__all__ = ["HangulConfig", "make_hangul", "jamo", "shared_jamo", "split_syllables",
           "pair_syllables", "main"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the rendering changes (hangul.json records it)
GENERATOR = "hfsoftmax.data.hangul"
FIRST, NUM_INITIAL, NUM_MEDIAL, NUM_FINAL = 0xAC00, 19, 21, 28
NUM_SYLLABLES = NUM_INITIAL * NUM_MEDIAL * NUM_FINAL  # 11,172
_SPLIT, _IMAGES, _PAIR = 1, 2, 3  # seed-stream tags
_MAX_IMAGES_PER_CLASS = 1000
_MAX_PAIRS = 1_000_000


@dataclass(frozen=True)
class HangulConfig:
    """Parameters of the Hangul set (all of them, and the font files, determine the bytes)."""
    num_classes: int = 10000
    images_per_class: int = 4
    heldout_per_class: int = 2
    num_verify_classes: int = NUM_SYLLABLES - 10000
    num_pairs: int = 4000
    seed: int = 0
    fonts: tuple[str, ...] = ()  # font file names; () = the installed default fonts
    noise: float = 8.0           # max std of pixel noise (0..255 scale)

    def validate(self) -> None:
        for name, lo, hi in (("num_classes", 1, NUM_SYLLABLES - 2),
                             ("images_per_class", 1, _MAX_IMAGES_PER_CLASS),
                             ("heldout_per_class", 0, _MAX_IMAGES_PER_CLASS),
                             ("num_verify_classes", 2, NUM_SYLLABLES - 1),
                             ("num_pairs", 0, _MAX_PAIRS)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must lie in [{lo}, {hi}], got {v}")
        if self.num_classes + self.num_verify_classes > NUM_SYLLABLES:
            raise ValueError(f"num_classes + num_verify_classes = {self.num_classes} + "
                             f"{self.num_verify_classes} exceeds the {NUM_SYLLABLES} syllables; "
                             "lower one of them")
        if self.num_pairs % 2:
            raise ValueError(f"num_pairs must be even (half same, half different), got "
                             f"{self.num_pairs}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if not 1 <= self.noise <= 100:
            raise ValueError(f"noise must lie in [1, 100], got {self.noise}")


def jamo(s) -> tuple:
    """(initial, medial, final) indices of syllable index ``s`` (0-based from U+AC00)."""
    return s // (NUM_MEDIAL * NUM_FINAL), (s // NUM_FINAL) % NUM_MEDIAL, s % NUM_FINAL


def shared_jamo(a, b):
    """How many of their three jamo syllables ``a`` and ``b`` (indices) share."""
    ja, jb = jamo(np.asarray(a)), jamo(np.asarray(b))
    return sum((x == y).astype(np.int64) for x, y in zip(ja, jb))


def split_syllables(cfg: HangulConfig) -> tuple[np.ndarray, np.ndarray]:
    """(verification syllables, training syllables in class order), disjoint."""
    perm = np.random.default_rng([cfg.seed, _SPLIT]).permutation(NUM_SYLLABLES)
    v = cfg.num_verify_classes
    return perm[:v], perm[v:v + cfg.num_classes]


def _lookalikes(pool: np.ndarray) -> list[np.ndarray]:
    """For each pool syllable, the pool syllables sharing exactly two jamo with it: those with
    the same (initial, medial), (initial, final) or (medial, final); one syllable can share
    only one such pair with another."""
    ini, med, fin = jamo(pool)
    groups: dict[tuple, list[int]] = {}
    keys = [(0, ini, med), (1, ini, fin), (2, med, fin)]
    for k, x, y in keys:
        for j, (a, b) in enumerate(zip(x.tolist(), y.tolist())):
            groups.setdefault((k, a, b), []).append(j)
    out = []
    for j in range(pool.size):
        nb = [m for k, x, y in keys for m in groups[(k, int(x[j]), int(y[j]))] if m != j]
        out.append(pool[np.array(sorted(nb), dtype=np.int64)])
    return out


def pair_syllables(cfg: HangulConfig) -> tuple[np.ndarray, list[str]]:
    """Syllable indices ``(P, 2)`` and kinds of the verification pairs (module docstring)."""
    pool, _ = split_syllables(cfg)
    near = _lookalikes(pool)
    has_near = np.flatnonzero([n.size > 0 for n in near])
    if cfg.num_pairs and has_near.size == 0:
        raise ValueError(f"the {pool.size} verification syllables hold no look-alike pair; "
                         "raise num_verify_classes")
    pairs = np.empty((cfg.num_pairs, 2), dtype=np.int64)
    kinds = []
    for i in range(cfg.num_pairs):
        r = np.random.default_rng([cfg.seed, _PAIR, i])
        kind = pair_kind_of_index(i)
        if kind == "lookalike":
            j = int(has_near[r.integers(has_near.size)])
            a, b = pool[j], near[j][r.integers(near[j].size)]
        else:
            a = b = pool[r.integers(pool.size)]
            if kind == "other":
                b = _other(a, pool, r)
        pairs[i] = a, b
        kinds.append(kind)
    return pairs, kinds


def _other(a: int, pool: np.ndarray, r: np.random.Generator) -> int:
    """A pool syllable sharing at most one jamo with ``a``: a few random draws (nearly every
    syllable qualifies), else a draw among those that do."""
    for _ in range(16):
        b = pool[r.integers(pool.size)]
        if shared_jamo(a, b) <= 1:
            return b
    cand = pool[shared_jamo(a, pool) <= 1]
    if cand.size == 0:
        raise ValueError(f"syllable {chr(FIRST + int(a))} shares two jamo with every other "
                         "verification syllable; raise num_verify_classes")
    return cand[r.integers(cand.size)]


def _render(ch_index: int, cfg: HangulConfig, fonts: list[str], n: int, stream: int):
    r = np.random.default_rng([cfg.seed, _IMAGES, int(ch_index), stream])
    ch = chr(FIRST + int(ch_index))
    return [render_syllable(ch, fonts, r, cfg.noise) for _ in range(n)]


def _render_classes(task):
    cfg, fonts, syllables = task
    n = cfg.images_per_class + cfg.heldout_per_class
    return [_render(s, cfg, fonts, n, 0) for s in syllables]


def _render_pairs(task):
    cfg, fonts, first, pairs = task
    # streams 1+2i and 2+2i: a syllable's images differ from pair to pair and from its
    # training images (stream 0)
    return [(_render(a, cfg, fonts, 1, 1 + 2 * i)[0], _render(b, cfg, fonts, 1, 2 + 2 * i)[0])
            for i, (a, b) in enumerate(pairs, start=first)]


def _config_dict(cfg: HangulConfig) -> dict:
    return dict(asdict(cfg), fonts=list(cfg.fonts))


def make_hangul(out_dir: str | os.PathLike, num_classes: int = 10000,
                images_per_class: int = 4, seed: int = 0, *, heldout_per_class: int = 2,
                num_verify_classes: int = NUM_SYLLABLES - 10000, num_pairs: int = 4000,
                fonts: tuple[str, ...] = (), noise: float = 8.0, font_dirs: tuple | None = None,
                workers: int | None = None, progress: bool = False, force: bool = False) -> dict:
    """Write the Hangul set to ``out_dir`` (module docstring); returns the summary also
    written to ``hangul.json``. ``workers`` processes render (default: all cores); the bytes
    do not depend on it. ``font_dirs``: where to look for the fonts (``/usr/share/fonts``)."""
    cfg = HangulConfig(num_classes, images_per_class, heldout_per_class, num_verify_classes,
                       num_pairs, seed, tuple(fonts), noise)
    cfg.validate()
    paths = find_fonts(cfg.fonts or None, *([tuple(font_dirs)] if font_dirs else []))
    out_dir = os.fspath(out_dir)
    claim_folder(out_dir, "hangul", GENERATOR, _config_dict(cfg), force=force)
    workers = max(1, workers or os.cpu_count() or 1)
    t0 = time.perf_counter()
    pool, train = split_syllables(cfg)
    pairs, kinds = pair_syllables(cfg)
    C, K, H = cfg.num_classes, cfg.images_per_class, cfg.heldout_per_class
    chunk = max(1, min(64, C // (4 * workers) or 1))
    tasks = [(cfg, paths, train[s:s + chunk].tolist()) for s in range(0, C, chunk)]
    pair_tasks = [(cfg, paths, s, pairs[s:s + 32].tolist()) for s in range(0, len(pairs), 32)]
    n_images = C * (K + H) + 2 * len(pairs)
    bins = render_set(out_dir, [K] * C, H, workers, _render_classes, tasks, _render_pairs,
                      pair_tasks, progress_bar(progress, n_images, "hangul"))
    seconds = time.perf_counter() - t0
    ini, med, _ = jamo(train)
    family = ini * NUM_MEDIAL + med
    syl = lambda s: chr(FIRST + int(s))  # noqa: E731
    meta = {
        "set": "hangul", "generator": GENERATOR, "format_version": FORMAT_VERSION,
        "config": _config_dict(cfg), "workers": workers, "num_classes": C,
        "train_images": C * K, "heldout_images": C * H, "pairs": len(kinds),
        "same_pairs": kinds.count("same"), "families": int(np.unique(family).size),
        "bin": "hangul.bin", "verify_syllables": int(pool.size),
        "fonts": font_records(paths), "versions": versions(),
        "seconds": round(seconds, 3), "images_per_s": round(n_images / seconds, 1),
        "class_family": family.tolist(), "class_size": [K] * C, "pair_kind": kinds,
        "class_syllable": [syl(s) for s in train],
        "pair_syllables": [[syl(a), syl(b)] for a, b in pairs],
    }
    write_set(out_dir, meta, bins)
    logger.info("hangul set: %d syllables x %d images (+%d held out) and %d pairs written to "
                "%s in %.1f s (%.0f images/s, %d workers, %d fonts)", C, K, H, len(kinds),
                out_dir, seconds, n_images / seconds, workers, len(paths))
    return summary_of(meta)


def _prepared(out_dir: str, cfg: HangulConfig, paths: list[str]) -> dict | None:
    meta = prepared_meta(out_dir, "hangul", FORMAT_VERSION, _config_dict(cfg),
                         heldout=cfg.heldout_per_class > 0)
    if meta is None or meta.get("fonts") != font_records(paths):
        return None  # other parameters, or other font files (the bytes would differ)
    return meta


def main(argv: list[str] | None = None) -> dict:
    """Command line of ``datasets/prepare_hangul.py``."""
    d = HangulConfig()
    ap = argparse.ArgumentParser(description="Write the Hangul glyph set (rendered syllables as "
                                 "classes) in InsightFace's layout (train.rec/idx, property, "
                                 "heldout.rec/idx, hangul.bin, hangul.json); see "
                                 "datasets/README.md.")
    ap.add_argument("--out", default="datasets/data/hangul", help="output folder")
    ap.add_argument("--num-classes", type=int, default=d.num_classes,
                    help="training syllables (classes)")
    ap.add_argument("--images-per-class", type=int, default=d.images_per_class)
    ap.add_argument("--heldout-per-class", type=int, default=d.heldout_per_class)
    ap.add_argument("--verify-classes", type=int, default=d.num_verify_classes,
                    help="syllables kept out of training for the verification pairs")
    ap.add_argument("--pairs", type=int, default=d.num_pairs,
                    help="verification pairs in hangul.bin (even; half same)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--fonts", default="", help="comma-separated font file names or paths "
                    "(default: the installed fonts of the three Debian packages)")
    ap.add_argument("--font-dir", action="append", default=None,
                    help="where to look for fonts (repeatable; default /usr/share/fonts)")
    ap.add_argument("--noise", type=float, default=d.noise)
    ap.add_argument("--workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--force", action="store_true", help="rewrite even if the folder already "
                    "holds this exact set; replace a folder holding another set")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fonts = tuple(f.strip() for f in args.fonts.split(",") if f.strip())
    cfg = HangulConfig(args.num_classes, args.images_per_class, args.heldout_per_class,
                       args.verify_classes, args.pairs, args.seed, fonts, args.noise)
    try:
        cfg.validate()
        paths = find_fonts(fonts or None, *([tuple(args.font_dir)] if args.font_dir else []))
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    conflict = folder_conflict(args.out, "hangul")
    if conflict and not args.force:
        ap.error(conflict)
    if not args.force and _prepared(args.out, cfg, paths) is not None:
        logger.info("%s already holds this hangul set (hangul.json matches, same font files); "
                    "use --force to rewrite", args.out)
        meta = summary_of(read_meta(args.out)["hangul"])
        print(json.dumps(meta))
        return meta
    summary = make_hangul(args.out, cfg.num_classes, cfg.images_per_class, cfg.seed,
                          heldout_per_class=cfg.heldout_per_class,
                          num_verify_classes=cfg.num_verify_classes, num_pairs=cfg.num_pairs,
                          fonts=cfg.fonts, noise=cfg.noise, font_dirs=args.font_dir,
                          workers=args.workers, progress=not args.no_progress,
                          force=args.force)
    print(json.dumps(summary))
    return summary
