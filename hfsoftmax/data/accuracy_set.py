"""The accuracy-set contract: one folder layout and one metadata file for every set this
project generates for the accuracy benchmark (the synthetic face-like set, its long-tailed
variant, the Hangul glyph set), so a benchmark reads classes, look-alike families and pair
kinds the same way for all of them. This module is the one place that writes and reads it.

A prepared folder holds:

- ``train.rec``, ``train.idx``, ``property``: InsightFace's layout (see
  :mod:`hfsoftmax.data.insightface`): record 0 ``flag=2, label=[first, end)``, image records
  ``1 .. first-1`` labelled with their class (classes in order, a class's images adjacent),
  one identity record per class with its ``[a, b)`` image range; ``property`` is
  ``C,112,112``;
- ``heldout.rec``, ``heldout.idx``: other images of the same training classes, same layout
  (closed-set top-1), present when ``heldout_images > 0``;
- the verification ``.bin`` named by ``bin``: pairs of identities *not* among the training
  classes, in InsightFace's Python 2 pickle layout (:func:`~.verification.dump_bin`);
- ``<set>.json``, the metadata, with at least

  ==================  ========================================================================
  ``set``             the set's name, also the file's stem: ``synthetic``, ``longtail``,
                      ``hangul``
  ``generator``       the module that wrote it; ``format_version`` its rendering version
  ``complete``        ``true`` once every file is written (``false`` while a prepare runs)
  ``config``          the generator's parameters (everything that determines the bytes)
  counts              ``num_classes``, ``train_images``, ``heldout_images``, ``pairs``,
                      ``same_pairs``, ``families``
  ``bin``             the file name of the verification ``.bin``
  ``class_family``    one int per training class: its look-alike family (diagnostics only:
                      families are defined by the generator, independently of any model)
  ``class_size``      one int per training class: its number of training images
  ``pair_kind``       one of ``same``/``lookalike``/``other`` per pair, in ``.bin`` order
  ==================  ========================================================================

  and whatever else the generator records (timing, fonts, the syllable of each class...);
  other per-class lists are named ``class_*`` and per-pair lists ``pair_*`` too.

Folders made before this contract (``synthetic.json`` without ``set``) are read too: their
pair kinds follow the synthetic set's rule by index (:func:`pair_kind_of_index`).

>>> info = read_set_info("datasets/data/hangul")
>>> info["bin_path"], info["class_family"].shape, (info["pair_kind"] == "lookalike").sum()
"""
from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from ..fileio import write_json, write_text
from .recordio import IRHeader, RecordIOWriter, pack
from .verification import dump_bin

__all__ = ["PAIR_KINDS", "SETS", "pair_kind_of_index", "SetWriter", "write_set", "check_meta",
           "read_meta", "folder_conflict", "claim_folder", "files_present", "prepared_meta",
           "summary_of", "read_set_info", "prepare_set", "worker_map", "progress_bar",
           "pair_images", "render_set"]

PAIR_KINDS = ("same", "lookalike", "other")
IMAGE_SIZE = 112
# set name -> (module, function) of its command line; datasets/prepare_<name>.py calls it
SETS = {"synthetic": ("hfsoftmax.data.synthetic", "main"),
        "longtail": ("hfsoftmax.data.synthetic", "main_longtail"),
        "hangul": ("hfsoftmax.data.hangul", "main")}
_MAX_META_BYTES = 1 << 30  # a metadata file holds a few ints per class and pair


def pair_kind_of_index(i: int) -> str:
    """The balanced order of pairs the generators use: even pairs are ``same``, ``i % 4 ==
    1`` ``lookalike``, ``i % 4 == 3`` ``other``; every block of 4 pairs holds two same and two
    different pairs, so 10-fold evaluation folds are balanced too."""
    return "same" if i % 2 == 0 else ("lookalike" if i % 4 == 1 else "other")


@contextlib.contextmanager
def worker_map(workers: int) -> Iterator[Callable]:
    """An ordered ``imap`` over ``workers`` processes (plain ``map`` for one): results come
    back in task order, so bytes never depend on the worker count."""
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        yield pool.imap if pool is not None else map
    finally:
        if pool is not None:
            pool.terminate()


def progress_bar(show: bool, total: int, desc: str):
    """A tqdm bar counting ``total`` images (``desc`` its label), or None unless ``show``."""
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc=desc)


def pair_images(imap: Callable, render_pairs: Callable, tasks: Sequence, bar=None) -> list[bytes]:
    """The images of a set's verification pairs, in ``.bin`` order (pair i: images 2i and
    2i+1): ``render_pairs(task)`` gives a list of ``(a, b)`` encoded images, mapped over
    ``tasks`` in order by ``imap`` (:func:`worker_map`); ``bar`` counts them."""
    bins = []
    for result in imap(render_pairs, tasks):
        for a, b in result:
            bins += [a, b]
        if bar is not None:
            bar.update(2 * len(result))
    return bins


def render_set(out_dir: str, class_sizes: Sequence[int], heldout_per_class: int, workers: int,
               render_classes: Callable, class_tasks: Sequence, render_pairs: Callable,
               pair_tasks: Sequence, bar=None) -> list[bytes]:
    """Render a set's images on ``workers`` processes: the classes' into ``train`` and
    ``heldout`` records (:class:`SetWriter`; ``render_classes(task)`` gives, per class in
    order, its training then held-out images), then the pairs' (:func:`pair_images`), which
    it returns for :func:`write_set`. The one loop every generator runs, so each writes,
    aborts on an error and counts progress alike; ``bar`` (:func:`progress_bar`) is closed."""
    writer = SetWriter(out_dir, class_sizes, heldout_per_class)
    try:
        with worker_map(workers) as imap:
            for result in imap(render_classes, class_tasks):
                for images in result:
                    writer.add(images)
                    if bar is not None:
                        bar.update(len(images))
            bins = pair_images(imap, render_pairs, pair_tasks, bar)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return bins


# -- writing --------------------------------------------------------------------------------

class SetWriter:
    """Writes ``train.rec/idx`` and ``heldout.rec/idx`` class by class (in class order).

    ``class_sizes[c]`` training images of class c (image keys ``1 + sum(sizes[:c]) + k``),
    ``heldout_per_class`` held-out images each (no held-out files when 0). Both files are
    moved into place only by :meth:`close` (:class:`~.recordio.RecordIOWriter`).
    """

    def __init__(self, out_dir: str, class_sizes: Sequence[int], heldout_per_class: int):
        self.sizes = [int(n) for n in class_sizes]
        self.heldout = int(heldout_per_class)
        self._start = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()
        self._next = 0
        self.train = self._open(out_dir, "train", self._start[-1])
        self.held = (self._open(out_dir, "heldout", self.heldout * len(self.sizes))
                     if self.heldout else None)

    def _open(self, out_dir: str, name: str, n_images: int) -> RecordIOWriter:
        w = RecordIOWriter(os.path.join(out_dir, f"{name}.rec"),
                           os.path.join(out_dir, f"{name}.idx"))
        first = n_images + 1
        w.write_idx(0, pack(IRHeader(2, [first, first + len(self.sizes)], 0, 0), b""))
        return w

    def add(self, images: Sequence[bytes]) -> None:
        """The next class's encoded images: its training images, then its held-out ones."""
        c = self._next
        if c >= len(self.sizes):
            raise ValueError(f"SetWriter got a class {c} beyond the {len(self.sizes)} declared")
        k_n, h_n = self.sizes[c], self.heldout
        if len(images) != k_n + h_n:
            raise ValueError(f"class {c}: {len(images)} images given, expected {k_n} training "
                             f"+ {h_n} held-out")
        for k in range(k_n):
            key = 1 + self._start[c] + k
            self.train.write_idx(key, pack(IRHeader(0, float(c), key, 0), images[k]))
        for k in range(h_n):
            key = 1 + c * h_n + k
            self.held.write_idx(key, pack(IRHeader(0, float(c), key, 0), images[k_n + k]))
        self._next += 1

    def close(self) -> None:
        """Write the identity records and move both files into place."""
        n = len(self.sizes)
        if self._next != n:
            raise ValueError(f"SetWriter closed after {self._next} of {n} classes")
        held_start = [self.heldout * c for c in range(n + 1)]
        for w, start in ((self.train, self._start), (self.held, held_start)):
            if w is None:
                continue
            first = start[-1] + 1
            for c in range(n):  # identity records: label = [a, b) of the class's images
                w.write_idx(first + c, pack(IRHeader(2, [1 + start[c], 1 + start[c + 1]], 0, 0),
                                            b""))
            w.close()

    def abort(self) -> None:
        for w in (self.train, self.held):
            if w is not None:
                w.abort()


def write_set(out_dir: str, meta: dict, bins: Sequence[bytes]) -> dict:
    """Finish a set: its ``.bin`` (``meta["bin"]``, same flags from ``meta["pair_kind"]``),
    ``property`` and, last, ``<set>.json`` with ``complete: true``; checks the contract's
    keys first. Returns the metadata written."""
    kinds = list(meta["pair_kind"])
    check_meta(meta, os.path.join(out_dir, f"{meta['set']}.json"))
    if len(bins) != 2 * len(kinds):
        raise ValueError(f"{len(bins)} images for {len(kinds)} pairs: need exactly 2 per pair")
    dump_bin(os.path.join(out_dir, meta["bin"]), bins, [k == "same" for k in kinds])
    write_text(os.path.join(out_dir, "property"),
               f"{meta['num_classes']},{IMAGE_SIZE},{IMAGE_SIZE}")
    meta = dict(meta, complete=True)
    write_json(os.path.join(out_dir, f"{meta['set']}.json"), meta)
    return meta


def check_meta(meta: dict, where: str) -> None:
    missing = [k for k in ("set", "generator", "format_version", "config", "num_classes",
                           "train_images", "heldout_images", "pairs", "same_pairs", "families",
                           "bin", "class_family", "class_size", "pair_kind") if k not in meta]
    if missing:
        raise ValueError(f"{where}: metadata lacks {missing} (see hfsoftmax.data.accuracy_set)")
    c, p = meta["num_classes"], meta["pairs"]
    for key, n in (("class_family", c), ("class_size", c), ("pair_kind", p)):
        if len(meta[key]) != n:
            raise ValueError(f"{where}: {key} has {len(meta[key])} entries, expected {n}")
    bad = sorted(set(meta["pair_kind"]) - set(PAIR_KINDS))
    if bad:
        raise ValueError(f"{where}: unknown pair kinds {bad}; valid: {list(PAIR_KINDS)}")
    if sum(meta["class_size"]) != meta["train_images"]:
        raise ValueError(f"{where}: class sizes sum to {sum(meta['class_size'])}, but "
                         f"train_images is {meta['train_images']}")
    if sum(k == "same" for k in meta["pair_kind"]) != meta["same_pairs"]:
        raise ValueError(f"{where}: pair_kind and same_pairs disagree")


# -- folders --------------------------------------------------------------------------------

def read_meta(folder: str | os.PathLike) -> dict[str, dict]:
    """The accuracy-set metadata files in ``folder``: set name -> its JSON (complete or not).
    A legacy ``synthetic.json`` (before this contract: no ``set`` key) counts as the set
    ``synthetic``; other JSON files are ignored."""
    folder = os.fspath(folder)
    out = {}
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        path = os.path.join(folder, name)
        try:
            if os.path.getsize(path) > _MAX_META_BYTES:
                continue
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        stem = name[:-len(".json")]
        if meta.get("set") == stem or (stem == "synthetic" and "set" not in meta
                                        and "class_family" in meta):
            out[stem] = meta
    return out


def folder_conflict(out_dir: str | os.PathLike, set_name: str) -> str | None:
    """Why ``out_dir`` must not receive the set ``set_name`` without ``--force``: it holds
    another set, or an InsightFace ``train.rec`` that no generator wrote (a user's data).
    None when the folder is free or holds ``set_name`` (complete or not)."""
    out_dir = os.fspath(out_dir)
    metas = read_meta(out_dir)
    others = sorted(n for n in metas if n != set_name)
    if others:
        what = f"the {others[0]!r} set ({others[0]}.json)"
    elif not metas and os.path.exists(os.path.join(out_dir, "train.rec")):
        what = "a train.rec that no prepare script wrote (no <set>.json)"
    else:
        return None
    return (f"{out_dir} holds {what}; choose another --out folder for the {set_name!r} set, "
            "or pass --force (force=True) to replace it")


def claim_folder(out_dir: str, set_name: str, generator: str, config: dict, *,
                 force: bool = False) -> None:
    """Make ``out_dir`` ready to receive the set ``set_name``: refuse it when
    :func:`folder_conflict` objects (``force``: replace it, removing another set's metadata
    and ``.bin``), then mark ``<set>.json`` incomplete, so a prepare interrupted at any point
    is never taken for a prepared set."""
    out_dir = os.fspath(out_dir)
    conflict = folder_conflict(out_dir, set_name)
    if conflict and not force:
        raise ValueError(conflict)
    metas = read_meta(out_dir)
    for other in sorted(n for n in metas if n != set_name):
        for name in (f"{other}.json", metas[other].get("bin") or f"{other}.bin"):
            path = os.path.join(out_dir, os.path.basename(str(name)))
            if os.path.isfile(path):
                os.unlink(path)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{set_name}.json"),
               {"set": set_name, "generator": generator, "complete": False, "config": config})


def _complete(meta: dict) -> bool:
    return meta.get("complete", True) is True  # legacy files were written last: complete


def prepared_meta(out_dir: str | os.PathLike, set_name: str, format_version: int,
                  config: dict, *, heldout: bool = True) -> dict | None:
    """The metadata of ``out_dir`` when it holds the complete set ``set_name`` made with
    exactly ``config`` (and ``format_version``), its files present; else None."""
    out_dir = os.fspath(out_dir)
    meta = read_meta(out_dir).get(set_name)
    if meta is None or not _complete(meta) or meta.get("format_version") != format_version:
        return None
    if meta.get("config") != config or not files_present(out_dir, meta, set_name, heldout):
        return None
    return meta


def files_present(out_dir: str, meta: dict, set_name: str, heldout: bool) -> bool:
    """Whether the files of the contract are all in ``out_dir``."""
    needed = ["train.rec", "train.idx", "property",
              os.path.basename(str(meta.get("bin") or f"{set_name}.bin"))]
    if heldout:
        needed += ["heldout.rec", "heldout.idx"]
    return all(os.path.isfile(os.path.join(out_dir, n)) for n in needed)


def summary_of(meta: dict) -> dict:
    """The metadata without its per-class and per-pair lists (keys ``class_*``/``pair_*``
    holding lists), for logs and JSON lines."""
    return {k: v for k, v in meta.items()
            if not (k.startswith(("class_", "pair_")) and isinstance(v, list))}


# -- reading --------------------------------------------------------------------------------

def read_set_info(folder: str | os.PathLike, name: str | None = None) -> dict:
    """What a benchmark needs from a prepared set, the same way for every generator.

    Returns ``set``, ``generator``, ``config``, ``folder``, ``bin_path`` (the verification
    ``.bin``), the counts ``num_classes``, ``train_images``, ``heldout_images``, ``pairs``,
    ``families``, and the arrays ``class_family`` (int64, one per training class),
    ``class_size`` (int64) and ``pair_kind`` (str, one per pair in ``.bin`` order), plus
    ``meta`` (the metadata without those arrays). ``name`` picks one set when a folder holds
    several metadata files.
    """
    folder = os.fspath(folder)
    metas = read_meta(folder)
    if name is not None:
        metas = {name: metas[name]} if name in metas else {}
    if len(metas) != 1:
        scripts = ", ".join(f"datasets/prepare_{n}.py" for n in SETS)
        what = ("no accuracy-set metadata (<set>.json)" if not metas
                else f"several sets ({sorted(metas)}); pass name=")
        raise ValueError(f"{folder} holds {what}; prepare a set there with {scripts}")
    set_name, meta = next(iter(metas.items()))
    where = os.path.join(folder, f"{set_name}.json")
    if not _complete(meta):
        raise ValueError(f"{where}: the set is incomplete (a prepare was interrupted); run "
                         f"datasets/prepare_{set_name}.py with the same arguments again")
    if "set" not in meta:  # a synthetic set written before this contract
        from .synthetic import SyntheticConfig, class_sizes, pair_kinds
        cfg = SyntheticConfig(**meta["config"])
        meta = dict(meta, set="synthetic", generator="hfsoftmax.data.synthetic",
                    bin="synthetic.bin", num_classes=cfg.num_classes,
                    class_size=class_sizes(cfg).tolist(),
                    pair_kind=pair_kinds(cfg, meta["pairs"]))
    check_meta(meta, where)
    bin_path = os.path.join(folder, os.path.basename(meta["bin"]))
    from .insightface import read_property  # deferred: it pulls in the torch-side readers
    num_classes = read_property(os.path.join(folder, "property"))[0]
    if num_classes != meta["num_classes"]:
        raise ValueError(f"{where}: {meta['num_classes']} classes, but property says "
                         f"{num_classes}; prepare the set again")
    needed = [bin_path] + [os.path.join(folder, f"{s}.{e}") for e in ("rec", "idx")
                           for s in (("train", "heldout") if meta["heldout_images"] else
                                     ("train",))]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{where}: files missing: {missing}; prepare the set again")
    return {
        "set": meta["set"], "generator": meta["generator"], "config": meta["config"],
        "folder": folder, "bin_path": bin_path,
        **{k: int(meta[k]) for k in ("num_classes", "train_images", "heldout_images",
                                     "pairs", "families")},
        "class_family": np.asarray(meta["class_family"], dtype=np.int64),
        "class_size": np.asarray(meta["class_size"], dtype=np.int64),
        "pair_kind": np.asarray(meta["pair_kind"], dtype=str),
        "meta": summary_of(meta),
    }


def prepare_set(name: str, argv: Sequence[str]) -> dict:
    """Prepare (or reuse) the set ``name`` as ``datasets/prepare_<name>.py argv`` would;
    returns its summary."""
    if name not in SETS:
        raise ValueError(f"Unknown accuracy set {name!r}; valid: {sorted(SETS)}")
    module, func = SETS[name]
    return getattr(importlib.import_module(module), func)(list(argv))
