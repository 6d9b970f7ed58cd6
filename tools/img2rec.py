#!/usr/bin/env python
"""Pack an image folder (``DIR/<class>/<image>``) or an image list into an InsightFace
training folder: ``train.rec``, ``train.idx``, ``property`` (no MXNet needed).

    python tools/img2rec.py --image-folder faces/ --out-folder faces_rec/ --workers 4
    python tools/img2rec.py --list all.lst --prefix images/ --out-folder faces_rec/

- Classes and labels: an image folder's by :mod:`hfsoftmax.data.folder`'s rule (the one
  ``--train-folder`` uses: class folders by number where all are numbers, else by name);
  a list's labels as written (``relative/path label`` lines). Images are stored grouped by
  label (a list keeps its order within a label); each image's bytes are stored verbatim
  (no decode, no re-encode), so ``tools/rec2img.py`` gives back the same bytes.
- Layout: InsightFace's (record 0 ``flag=2, label=[N+1, N+1+C]``, images at keys 1..N,
  one identity record ``[a, b)`` per class at keys N+1..N+C). Record 0 stores its counts as
  float32, exact only up to 2^24, so a set with N + C + 1 > 2^24 is written flat instead
  (images at keys 0..N-1, no identity records: what readers do for sets whose record 0 is
  an image). Class ids must be below 2^24 either way (float32 labels).
- Besides: ``img2rec.lst`` (line i = key i of the identity layout, key i-1 of the flat one:
  ``relative/path label`` of each packed image, an image list of the source),
  ``val.lst`` with ``--val-ratio`` (images held out of the .rec, per class by the rule of
  ``tools/split_train_val.py``; paths relative to the source, for ``--val-filelist``),
  ``classes.txt`` (an image folder's class names, line i = label i) and ``img2rec.json``
  (the manifest: source, options, progress, counts).
- Multi-process: ``--workers`` processes read and check the files (an image's magic bytes,
  its size from its header; ``--verify`` decodes it), the main process writes in order.
- Resumable: the files are written under hidden partial names and committed every
  ``--commit-every`` images (fsync, then the manifest's progress atomically). A killed run
  re-run with the same source and options truncates the partial files to the last commit
  and continues; a finished one is a no-op. Another source's output, or files of unknown
  origin, are refused (exit 2) unless ``--overwrite`` deletes them (only the names above).
  The source is identified by its list of (path, label): a file changed in place after it
  was packed is not noticed.
- Errors name the file; ``--skip-corrupt`` leaves unreadable images out, counted.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import os
import sys

if __package__ in (None, ""):  # run as `python tools/img2rec.py` from a checkout
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _root not in sys.path:
        sys.path.insert(0, _root)

from hfsoftmax.data.filelist import read_list, split_train_val, write_list  # noqa: E402
from hfsoftmax.data.folder import scan_image_folder  # noqa: E402
from hfsoftmax.data.recordio import IRHeader, frame_record, image_format, pack  # noqa: E402
from hfsoftmax.fileio import write_json, write_text  # noqa: E402

logger = logging.getLogger("img2rec")

MANIFEST = "img2rec.json"
OUTPUTS = ("train.rec", "train.idx", "property", "img2rec.lst", "classes.txt", "val.lst",
           MANIFEST)
PARTIAL = {"rec": ".img2rec.partial.rec", "idx": ".img2rec.partial.idx",
           "lst": ".img2rec.partial.lst"}
FLOAT32_EXACT = 1 << 24  # integers above this are not all representable in float32
MAX_IMAGE_BYTES = 64 << 20


class PackError(Exception):
    """The output folder holds something this run must not build on (exit 2)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plan(image_folder: str | None, list_path: str | None, prefix: str | None
         ) -> tuple[list[tuple[str, int]], list[str] | None, str, int]:
    """``(items grouped by label, class names or None, root folder, num_classes)``."""
    if image_folder is not None:
        items, classes = scan_image_folder(image_folder)
        return items, classes, os.path.abspath(image_folder), len(classes)
    items = read_list(list_path)
    if not items:
        raise ValueError(f"{list_path}: the image list is empty")
    root = os.path.abspath(prefix if prefix is not None else os.path.dirname(
        os.path.abspath(list_path)))
    order = sorted(range(len(items)), key=lambda i: items[i][1])  # stable: list order kept
    return [items[i] for i in order], None, root, max(lab for _, lab in items) + 1


def fingerprint(items: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for rel, label in items:
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def _read(task):
    """Read and check images; returns (status, bytes or message, size) per item."""
    root, chunk, image_size, verify = task
    from PIL import Image

    out = []
    for rel, _ in chunk:
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise ValueError(f"larger than {MAX_IMAGE_BYTES >> 20} MiB")
            if image_format(data) is None:
                raise ValueError(f"not a JPEG/PNG/BMP/GIF/WebP image (first bytes "
                                 f"{data[:8].hex()}, {len(data)} bytes)")
            try:
                img = Image.open(io.BytesIO(data))
            except Image.UnidentifiedImageError:
                raise ValueError(f"an image header PIL cannot read ({len(data)} bytes, "
                                 "truncated or corrupt)") from None
            size = (img.height, img.width)
            if verify:
                img.convert("RGB")
            out.append(("ok", data, size))
        except Exception as e:  # noqa: BLE001 - any failure to read means an unusable image
            out.append(("bad", f"{path}: {e}", None))
    return out


def _open_partials(out: str, progress: dict | None) -> dict:
    """The partial files, truncated to the committed sizes of ``progress`` (None: new)."""
    files = {}
    for kind, name in PARTIAL.items():
        path = os.path.join(out, name)
        if progress is None:
            f = open(path, "wb")
        else:
            f = open(path, "r+b")
            f.truncate(progress[f"{kind}_bytes"])
            f.seek(progress[f"{kind}_bytes"])
        files[kind] = f
    return files


def _partials_hold(out: str, progress: dict) -> bool:
    """Whether every partial file exists and holds at least its committed bytes."""
    for kind, name in PARTIAL.items():
        try:
            if os.path.getsize(os.path.join(out, name)) < progress[f"{kind}_bytes"]:
                return False
        except (OSError, KeyError):
            return False
    return True


def _sync(files: dict) -> dict:
    for f in files.values():
        f.flush()
        os.fsync(f.fileno())
    return {f"{k}_bytes": f.tell() for k, f in files.items()}


def _clear(out: str) -> None:
    for name in (*OUTPUTS, *PARTIAL.values()):
        try:
            os.unlink(os.path.join(out, name))
        except FileNotFoundError:
            pass


def _prepare(out: str, source: dict, options: dict, overwrite: bool) -> dict | None:
    """The manifest of this very packing to continue (or None: start afresh). Raises
    PackError where the folder holds anything else, unless ``overwrite`` (then cleared)."""
    man = None
    path = os.path.join(out, MANIFEST)
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                man = json.loads(f.read(1 << 20))
            if not isinstance(man, dict) or man.get("tool") != "img2rec":
                raise ValueError("not an img2rec manifest")
        except ValueError as e:
            if not overwrite:
                raise PackError(f"{path} cannot be read ({e}); pass --overwrite to delete "
                                f"{', '.join(OUTPUTS)} there, or pick another --out-folder"
                                ) from None
            man = None
    same = (man is not None and man.get("source", {}).get("fingerprint") == source["fingerprint"]
            and man.get("options") == options)
    if same and not overwrite:
        return man
    theirs = man is not None or any(os.path.exists(os.path.join(out, n)) for n in OUTPUTS)
    if theirs and not overwrite:
        what = (f"the packing of {man['source'].get('path')} ({man['source'].get('items')} "
                f"images, options {man.get('options')})" if man else "train.rec/train.idx/"
                "property of unknown origin (no img2rec.json)")
        raise PackError(f"{out} already holds {what}; refusing to pack {source['path']} "
                        f"({source['items']} images, options {options}) into it. Pass "
                        "--overwrite to delete it first, or pick another --out-folder")
    _clear(out)
    return None


def run(out: str, *, image_folder: str | None = None, list_path: str | None = None,
        prefix: str | None = None, workers: int = 1, image_size=(112, 112),
        skip_corrupt: bool = False, verify: bool = False, overwrite: bool = False,
        commit_every: int = 1000, progress: bool = True, on_commit=None,
        val_ratio: float = 0.0, seed: int = 0) -> dict:
    """Pack the source into ``out`` (see the module docstring); returns the counts.
    ``on_commit(manifest)`` is called after every commit (progress reporting)."""
    if (image_folder is None) == (list_path is None):
        raise ValueError("give --image-folder or --list (one of them)")
    if workers < 1 or commit_every < 1:
        raise ValueError(f"--workers and --commit-every must be >= 1, got {workers}, "
                         f"{commit_every}")
    items, classes, root, num_classes = plan(image_folder, list_path, prefix)
    val: list[tuple[str, int]] = []
    if val_ratio:  # held-out images of the training identities, not packed (--val-filelist)
        items, val = split_train_val(items, val_ratio, seed)
    out = os.path.abspath(out)
    if image_folder is not None and (out == root or out.startswith(root + os.sep)):
        raise ValueError(f"--out-folder {out} is inside --image-folder {root}: it would be "
                         "read as a class folder; pick a folder outside it")
    if num_classes > FLOAT32_EXACT:
        raise ValueError(f"{num_classes} classes: InsightFace's labels are float32, exact "
                         f"only below {FLOAT32_EXACT}")
    flat = len(items) + num_classes + 1 > FLOAT32_EXACT
    source = {"kind": "folder" if image_folder else "list",
              "path": os.path.abspath(image_folder or list_path), "root": root,
              "items": len(items), "num_classes": num_classes,
              "fingerprint": fingerprint(items)}
    options = {"layout": "flat" if flat else "identity", "image_size": list(image_size),
               "skip_corrupt": bool(skip_corrupt), "val_ratio": float(val_ratio),
               "seed": int(seed)}
    os.makedirs(out, exist_ok=True)
    man = _prepare(out, source, options, overwrite)
    if man is not None and man.get("complete"):
        logger.info("%s is already packed from %s (%d images): nothing to do", out,
                    source["path"], man["counts"]["records"])
        return {**man["counts"], "written_now": 0}
    prog = man["progress"] if man is not None else None
    if prog is not None and not _partials_hold(out, prog):
        logger.warning("%s: the partial files of the interrupted packing are missing or "
                       "shorter than its last commit; starting again", out)
        _clear(out)
        man = prog = None
    files = _open_partials(out, prog)
    if prog is None:
        prog = {"next_item": 0, "records": 0, "skipped": 0, "other_size": 0}
        if not flat:  # record 0, rewritten with the final counts at the end (same length)
            files["rec"].write(b"".join(frame_record(pack(IRHeader(2, [0.0, 0.0], 0, 0),
                                                          b""))))
            files["idx"].write(b"0\t0\n")
        man = {"tool": "img2rec", "complete": False, "source": source, "options": options,
               "started": _now()}
    else:
        logger.info("resuming %s at image %d of %d (%d packed so far)", out,
                    prog["next_item"], len(items), prog["records"])

    def commit():
        prog.update(_sync(files))
        man["progress"] = dict(prog)
        write_json(os.path.join(out, MANIFEST), man, indent=2)
        if on_commit is not None:
            on_commit(man)

    commit()
    first_key = 1 if not flat else 0
    chunk = max(1, min(16, commit_every))
    start = prog["next_item"]
    tasks = ((root, items[s:s + chunk], tuple(image_size), verify)
             for s in range(start, len(items), chunk))
    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=start, unit="img", desc="img2rec",
               disable=not progress)
    pool, since = None, 0
    try:
        if workers > 1:
            import multiprocessing
            pool = multiprocessing.get_context().Pool(workers)
            results = pool.imap(_read, tasks)
        else:
            results = map(_read, tasks)
        for batch in results:
            for status, data, size in batch:
                rel, label = items[prog["next_item"]]
                prog["next_item"] += 1
                if status == "bad":
                    if not skip_corrupt:
                        raise ValueError(f"{data} (--skip-corrupt leaves such images out)")
                    prog["skipped"] += 1
                    logger.warning("skipped: %s", data)
                    continue
                key = first_key + prog["records"]
                offset = files["rec"].tell()
                files["rec"].write(b"".join(frame_record(pack(IRHeader(0, float(label), key,
                                                                       0), data))))
                files["idx"].write(f"{key}\t{offset}\n".encode())
                files["lst"].write(f"{rel} {label}\n".encode())
                prog["records"] += 1
                prog["other_size"] += size != tuple(image_size)
                since += 1
            bar.update(len(batch))
            if since >= commit_every:
                commit()
                since = 0
        commit()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        for f in files.values():
            f.close()
    if val_ratio:
        write_list(os.path.join(out, "val.lst"), val)
    counts = _finish(out, man, classes, num_classes, image_size, flat)
    counts["val"] = len(val)
    logger.info("packed %d images of %d classes into %s (%d skipped, %d not %dx%d)",
                counts["records"], num_classes, out, counts["skipped"], counts["other_size"],
                *image_size)
    return {**counts, "written_now": counts["records"]}


def _finish(out: str, man: dict, classes, num_classes: int, image_size, flat: bool) -> dict:
    """Identity records and record 0's final counts (identity layout), then the partial
    files moved to their names, ``property``, ``classes.txt`` and the complete manifest."""
    prog = man["progress"]
    n = prog["records"]
    paths = {k: os.path.join(out, v) for k, v in PARTIAL.items()}
    if not flat:
        labels = []
        with open(paths["lst"], encoding="utf-8") as f:
            for line in f:
                labels.append(int(line.rsplit(maxsplit=1)[1]))
        with open(paths["rec"], "r+b") as rec, open(paths["idx"], "ab") as idx:
            head = b"".join(frame_record(pack(IRHeader(2, [float(n + 1),
                                                             float(n + 1 + num_classes)], 0, 0),
                                              b"")))
            rec.seek(0, os.SEEK_END)
            key, pos = n + 1, 0
            for c in range(num_classes):  # images are grouped by label: one pass
                a = pos
                while pos < n and labels[pos] == c:
                    pos += 1
                offset = rec.tell()
                rec.write(b"".join(frame_record(pack(IRHeader(2, [float(a + 1),
                                                                    float(pos + 1)], 0, 0),
                                                     b""))))
                idx.write(f"{key}\t{offset}\n".encode())
                key += 1
            if pos != n:
                raise AssertionError(f"images are not grouped by label (at {pos} of {n})")
            rec.seek(0)
            rec.write(head)  # record 0: same 40 bytes as the placeholder
            for f in (rec, idx):
                f.flush()
                os.fsync(f.fileno())
    os.replace(paths["rec"], os.path.join(out, "train.rec"))
    os.replace(paths["idx"], os.path.join(out, "train.idx"))
    os.replace(paths["lst"], os.path.join(out, "img2rec.lst"))
    write_text(os.path.join(out, "property"), f"{num_classes},{image_size[0]},{image_size[1]}")
    if classes is not None:
        write_text(os.path.join(out, "classes.txt"), "".join(f"{c}\n" for c in classes))
    counts = {"records": n, "skipped": prog["skipped"], "other_size": prog["other_size"],
              "num_classes": num_classes}
    man.update(complete=True, finished=_now(), counts=counts)
    write_json(os.path.join(out, MANIFEST), man, indent=2)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-folder", help="DIR/<class>/<image> files")
    src.add_argument("--list", dest="list_path", help="'relative/path label' lines")
    ap.add_argument("--prefix", default=None,
                    help="folder the --list paths are relative to (default: its folder)")
    ap.add_argument("--out-folder", required=True,
                    help="where train.rec, train.idx and property go")
    ap.add_argument("--workers", type=int, default=1, help="reading processes (default 1)")
    ap.add_argument("--image-size", type=int, nargs=2, default=[112, 112],
                    metavar=("H", "W"), help="the size property records (default 112 112); "
                                             "images of another size are counted")
    ap.add_argument("--skip-corrupt", action="store_true",
                    help="leave unreadable images out (counted) instead of stopping")
    ap.add_argument("--verify", action="store_true", help="also decode every image")
    ap.add_argument("--val-ratio", type=float, default=0.0,
                    help="hold this fraction of each class's images out of the .rec and list "
                         "them in val.lst (paths relative to the source, for the trainer's "
                         "--val-filelist with --val-prefix); default 0")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --val-ratio split")
    ap.add_argument("--commit-every", type=int, default=1000,
                    help="images between commits (what a killed run redoes at most)")
    ap.add_argument("--overwrite", action="store_true",
                    help=f"delete {', '.join(OUTPUTS)} of another packing in --out-folder")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.prefix is not None and args.list_path is None:
        print("img2rec: error: --prefix goes with --list", file=sys.stderr)
        return 2
    try:
        if min(args.image_size) < 1 or max(args.image_size) > 65535:
            raise ValueError(f"--image-size must be 1..65535, got {args.image_size}")
        counts = run(args.out_folder, image_folder=args.image_folder,
                     list_path=args.list_path, prefix=args.prefix, workers=args.workers,
                     image_size=tuple(args.image_size), skip_corrupt=args.skip_corrupt,
                     verify=args.verify, overwrite=args.overwrite,
                     commit_every=args.commit_every, progress=not args.no_progress,
                     val_ratio=args.val_ratio, seed=args.seed)
    except (PackError, FileNotFoundError, ValueError) as e:
        print(f"img2rec: error: {e}", file=sys.stderr)
        return 2
    print(f"{counts['records']} images of {counts['num_classes']} classes in "
          f"{os.path.join(args.out_folder, 'train.rec')} ({counts['skipped']} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
