#!/usr/bin/env python
"""Extract an InsightFace ``.rec`` folder into image files and train/val list files.

    python tools/rec2img.py --in-folder /data/faces_emore --out-folder /data/emore_images \
        --val-ratio 0.01 --workers 4

writes ``OUT/<class>/<record>.<ext>`` with the stored image bytes verbatim (no decode and
re-encode: ``ext`` is ``jpg`` or ``png`` from the bytes' magic), then ``OUT/train.lst`` and
``OUT/val.lst`` of ``<class>/<record>.<ext> <class>`` lines, usable with
``hfsoftmax.data.ImageListDataset(OUT/train.lst, prefix=OUT)``.

- The val split is per class and deterministic: within each class the images are ordered by a
  seeded hash of their relative path and the first ``round(val_ratio * n)`` go to val (at
  most n-1, so each class keeps a training image); see ``hfsoftmax.data.split_train_val``.
- ``OUT/rec2img.json`` (the manifest) names the source: the absolute path, size and mtime of
  the .rec and a fingerprint (sha256 of its first and last MiB and of the whole .idx). It is
  written, atomically, when a run starts (``"complete": false``) and again after the lists
  (``"complete": true``, with the counts).
- Re-running from the same source (same size and fingerprint) keeps the files that are
  already complete (same size as the stored bytes) and writes the missing ones; a finished
  extraction re-run with the same options writes nothing. Files are written to a temporary
  name and renamed, so an interrupted run never leaves a partial image under the final name.
  List files are written last.
- A folder whose manifest names another source is refused (exit 2): its images would be
  kept wherever the names collide. ``--overwrite`` first deletes that extraction (the
  ``<class>/<record>.<ext>`` images, the lists and the manifest; nothing else) and then
  extracts. A non-empty folder without a manifest (an older rec2img, or someone else's
  files) is redone: every image is rewritten, whatever is already there.
- Errors name the record and file (truncated .rec, bad magic, index past the end, bytes that
  are not an image); ``--skip-corrupt`` skips such records, counts them and leaves them out of
  the lists; ``--verify`` also decodes every image to catch corrupt JPEG/PNG data.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import re
import sys
import time

if __package__ in (None, ""):  # run as `python tools/rec2img.py` from a checkout
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _root not in sys.path:
        sys.path.insert(0, _root)

from hfsoftmax.data.filelist import read_list, split_train_val, write_list  # noqa: E402
from hfsoftmax.data.image import CorruptImageError, decode_image  # noqa: E402
from hfsoftmax.data.insightface import InsightFaceRecDataset  # noqa: E402
from hfsoftmax.data.recordio import RecordIOError, image_format  # noqa: E402
from hfsoftmax.fileio import atomic_write, write_json  # noqa: E402

logger = logging.getLogger("rec2img")

MANIFEST = "rec2img.json"
_MIB = 1 << 20
_CLASS_DIR = re.compile(r"[0-9]+")
# what _extract writes under a class folder: <record>.<ext>, its temporary name
# (atomic_write's .<record>.<ext>.<random>.tmp) and an older version's <record>.<ext>.tmp-<pid>
_OUR_FILE = re.compile(r"[0-9]+\.(jpg|png|bmp|gif|webp)(\.tmp-[0-9]+)?|"
                       r"\.[0-9]+\.(jpg|png|bmp|gif|webp)\.[0-9a-f]+\.tmp")


class OutputFolderError(Exception):
    """--out-folder holds another source's extraction (or an unreadable manifest): exit 2."""


_DS: InsightFaceRecDataset | None = None  # per worker process


def _raw(img):
    return img


def _open(in_folder: str, split: str) -> InsightFaceRecDataset:
    return InsightFaceRecDataset(in_folder, transform=_raw, split=split, image_size=None)


def _init_worker(in_folder: str, split: str) -> None:
    global _DS
    _DS = _open(in_folder, split)


def source_of(rec_path: str, idx_path: str) -> dict:
    """What identifies an extraction's source: the .rec's absolute path, size and mtime (for
    people) and a fingerprint (compared with the size): sha256 of the .rec's first and last
    MiB and of the whole .idx (a .idx is about 1/500 of its .rec, and any change in record
    sizes changes its offsets)."""
    st = os.stat(rec_path)
    h = hashlib.sha256()
    with open(rec_path, "rb") as f:
        h.update(f.read(_MIB))
        if st.st_size > _MIB:
            f.seek(max(_MIB, st.st_size - _MIB))
            h.update(f.read(_MIB))
    with open(idx_path, "rb") as f:
        for chunk in iter(lambda: f.read(_MIB), b""):
            h.update(chunk)
    mtime = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
    return {"rec": os.path.abspath(rec_path), "idx": os.path.abspath(idx_path),
            "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "mtime": mtime.isoformat(timespec="seconds"), "fingerprint": h.hexdigest(),
            "fingerprint_of": "sha256(first MiB of .rec + last MiB of .rec + whole .idx)"}


def _same_source(a: dict, b: dict) -> bool:
    return a.get("size") == b["size"] and a.get("fingerprint") == b["fingerprint"]


def _describe(src: dict) -> str:
    return (f"{src.get('rec')} ({src.get('size')} bytes, modified {src.get('mtime')}, "
            f"fingerprint {str(src.get('fingerprint'))[:12]})")


def read_manifest(out_folder: str) -> dict | None:
    """The manifest in ``out_folder``, or None if there is none; OutputFolderError if it
    cannot be read as one (then the folder's content is of unknown origin)."""
    path = os.path.join(out_folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MIB + 1)
    except FileNotFoundError:
        return None
    try:
        if len(raw) > _MIB:
            raise ValueError(f"larger than {_MIB} bytes")
        man = json.loads(raw)
        if not (isinstance(man, dict) and isinstance(man.get("source"), dict)
                and {"rec", "size", "fingerprint"} <= set(man["source"])):
            raise ValueError("no source with rec, size and fingerprint")
    except ValueError as e:
        raise OutputFolderError(f"{path} is not a rec2img manifest that can be read ({e}), so "
                                f"what {out_folder} holds is of unknown origin; pass --overwrite "
                                "to delete the extraction there, or choose another "
                                "--out-folder") from None
    return man


def clear_extraction(out_folder: str) -> int:
    """Delete what rec2img writes in ``out_folder`` (``<class>/<record>.<ext>`` images and
    their temporary files, the lists, the manifest) and nothing else; empty class folders are
    removed. Symlinks are not followed. Returns the number of images deleted."""
    removed = 0
    for entry in os.scandir(out_folder):
        if not (entry.is_dir(follow_symlinks=False) and _CLASS_DIR.fullmatch(entry.name)):
            continue
        for f in os.scandir(entry.path):
            if f.is_file(follow_symlinks=False) and _OUR_FILE.fullmatch(f.name):
                os.unlink(f.path)
                removed += 1
        try:
            os.rmdir(entry.path)
        except OSError:  # something else lives there: leave it
            pass
    for name in ("train.lst", "val.lst", MANIFEST):
        try:
            os.unlink(os.path.join(out_folder, name))
        except FileNotFoundError:
            pass
    return removed


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _extract(task):
    """Extract the images ``indices``; returns (index, rel, label, status, message) tuples,
    status one of 'written', 'exists', 'corrupt'. ``force`` rewrites files of the right size
    too (their origin is unknown)."""
    out_folder, indices, skip_corrupt, verify, force = task
    ds = _DS
    results = []
    for i in indices:
        key = ds.keys[i]
        where = f"record {key} of {ds.reader.rec_path}"
        try:
            data, label = ds.read_raw(i)
            ext = image_format(data)
            if ext is None:
                raise CorruptImageError(f"{where}: stored bytes are not a JPEG/PNG image "
                                        f"(first bytes {data[:8].hex()}, {len(data)} bytes)")
            if verify:
                decode_image(data, where, size=None)
        except (RecordIOError, CorruptImageError) as e:
            if not skip_corrupt:
                raise
            results.append((i, None, None, "corrupt", str(e)))
            continue
        rel = f"{label}/{key}.{ext}"
        path = os.path.join(out_folder, rel)
        try:
            if not force and os.path.getsize(path) == len(data):
                results.append((i, rel, label, "exists", None))
                continue
        except OSError:
            pass
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # a partial file never exists under the final name (no fsync per image: a killed
        # run is redone from its manifest, not from the disk's state after a power loss)
        with atomic_write(path, fsync=False) as f:
            f.write(data)
        results.append((i, rel, label, "written", None))
    return results


def _prepare(out_folder: str, source: dict, overwrite: bool) -> tuple[dict | None, bool]:
    """Decide what the folder's content is worth: returns (the manifest of the same source
    to build on, or None; whether every image must be rewritten). Raises OutputFolderError
    for another source's extraction unless ``overwrite``, which deletes it."""
    try:
        old = read_manifest(out_folder)
    except OutputFolderError:
        if not overwrite:
            raise
        removed = clear_extraction(out_folder)
        logger.warning("--overwrite: deleted %d images, the lists and the unreadable manifest "
                       "from %s", removed, out_folder)
        return None, False
    if old is not None and not _same_source(old["source"], source):
        if not overwrite:
            raise OutputFolderError(
                f"{out_folder} already holds the extraction of {_describe(old['source'])}; "
                f"refusing to extract {_describe(source)} into it (images whose names collide "
                "would be kept and the other set's images would stay beside them). Pass "
                "--overwrite to delete that extraction first, or choose another --out-folder")
        removed = clear_extraction(out_folder)
        logger.warning("--overwrite: deleted %d images, the lists and the manifest of %s from "
                       "%s", removed, _describe(old["source"]), out_folder)
        return None, False
    if old is not None:
        if old["source"].get("rec") != source["rec"]:
            logger.info("%s was extracted from %s: same size and fingerprint as %s, so its "
                        "files are kept", out_folder, old["source"].get("rec"), source["rec"])
        return old, overwrite
    if os.path.isdir(out_folder) and any(os.scandir(out_folder)):
        logger.warning("%s is not empty and has no %s (an older rec2img or other files): "
                       "every image is rewritten; files of another source are not removed",
                       out_folder, MANIFEST)
        return None, True
    return None, overwrite


def _write_lists(out_folder: str, train: list, val: list, check_first: bool) -> bool:
    """Write train.lst/val.lst; with ``check_first`` leave them alone when their content is
    already right. Returns whether anything was written."""
    paths = [os.path.join(out_folder, n) for n in ("train.lst", "val.lst")]
    if check_first and all(os.path.isfile(p) and read_list(p) == items
                           for p, items in zip(paths, (train, val))):
        return False
    for p, items in zip(paths, (train, val)):
        write_list(p, items)
    return True


def run(in_folder: str, out_folder: str, *, split: str = "train", val_ratio: float = 0.0,
        seed: int = 0, workers: int = 1, skip_corrupt: bool = False, verify: bool = False,
        progress: bool = True, chunk: int = 256, overwrite: bool = False) -> dict:
    """Extract ``in_folder``'s ``<split>.rec`` into ``out_folder``; returns counts.

    Raises OutputFolderError when ``out_folder`` holds another source's extraction and
    ``overwrite`` is false (see the module docstring for what is kept and what is redone).
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    ds = _open(in_folder, split)
    source = source_of(ds.reader.rec_path, ds.reader.idx_path)
    options = {"split": split, "val_ratio": val_ratio, "seed": seed}
    old, force = _prepare(out_folder, source, overwrite)
    os.makedirs(out_folder, exist_ok=True)
    manifest_path = os.path.join(out_folder, MANIFEST)
    started = _now()
    if old is None:  # claim the folder for this source before the first image lands
        write_json(manifest_path, {"tool": "rec2img", "complete": False, "source": source,
                                   "options": options, "started": started}, indent=2)
    tasks = [(out_folder, list(range(s, min(len(ds), s + chunk))), skip_corrupt, verify, force)
             for s in range(0, len(ds), chunk)]
    from tqdm import tqdm

    bar = tqdm(total=len(ds), unit="img", desc="rec2img", disable=not progress)
    items: list = [None] * len(ds)
    counts = {"written": 0, "exists": 0, "corrupt": 0}
    pool = None
    try:
        if workers > 1:
            import multiprocessing
            pool = multiprocessing.get_context().Pool(workers, _init_worker, (in_folder, split))
            results = pool.imap_unordered(_extract, tasks)
        else:
            _init_worker(in_folder, split)
            results = map(_extract, tasks)
        for batch in results:
            for i, rel, label, status, msg in batch:
                counts[status] += 1
                if status == "corrupt":
                    logger.warning("skipped: %s", msg)
                else:
                    items[i] = (rel, label)
            bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    kept = [it for it in items if it is not None]
    train, val = split_train_val(kept, val_ratio, seed)
    done_before = (old is not None and old.get("complete") is True
                   and old.get("options") == options and counts["written"] == 0)
    wrote_lists = _write_lists(out_folder, train, val, check_first=done_before)
    counts.update(images=len(ds), train=len(train), val=len(val), num_classes=ds.num_classes,
                  seconds=round(time.perf_counter() - t0, 3))
    if not (done_before and not wrote_lists):  # a finished extraction re-run changes nothing
        write_json(manifest_path, {
            "tool": "rec2img", "complete": True, "source": source, "options": options,
            "started": started, "finished": _now(),
            "counts": {k: counts[k] for k in ("images", "written", "exists", "corrupt", "train",
                                              "val", "num_classes")}}, indent=2)
    if counts["corrupt"]:
        logger.warning("%d corrupt record(s) skipped and left out of the lists", counts["corrupt"])
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-folder", required=True,
                    help="folder with <split>.rec, <split>.idx and property")
    ap.add_argument("--out-folder", required=True, help="where <class>/<record>.<ext> go")
    ap.add_argument("--split", default="train", help="which .rec/.idx pair (default: train)")
    ap.add_argument("--val-ratio", type=float, default=0.0,
                    help="fraction of each class's images listed in val.lst (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the val split hash")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--skip-corrupt", action="store_true",
                    help="skip and count unreadable records instead of stopping")
    ap.add_argument("--verify", action="store_true", help="decode every image as a check")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--overwrite", action="store_true",
                    help=f"if --out-folder holds the extraction of another .rec (its {MANIFEST}"
                         " names it), delete that extraction (images, lists, manifest) first "
                         "instead of refusing; for the same .rec, rewrite every image")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        counts = run(args.in_folder, args.out_folder, split=args.split,
                     val_ratio=args.val_ratio, seed=args.seed, workers=args.workers,
                     skip_corrupt=args.skip_corrupt, verify=args.verify,
                     progress=not args.no_progress, overwrite=args.overwrite)
    except OutputFolderError as e:
        print(f"rec2img: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RecordIOError, CorruptImageError, ValueError) as e:
        print(f"rec2img: error: {e}", file=sys.stderr)
        if isinstance(e, (RecordIOError, CorruptImageError)):
            print("rec2img: re-run with --skip-corrupt to skip unreadable records",
                  file=sys.stderr)
        return 1
    logger.info("%d images: %d written, %d already complete, %d corrupt skipped; %d in "
                "train.lst, %d in val.lst (%d classes) in %.1f s", counts["images"],
                counts["written"], counts["exists"], counts["corrupt"], counts["train"],
                counts["val"], counts["num_classes"], counts["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
