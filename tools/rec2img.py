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
- Re-running skips files that are already complete (same size as the stored bytes). Files
  are written to a temporary name and renamed, so an interrupted run never leaves a partial
  image under the final name. List files are written last.
- Errors name the record and file (truncated .rec, bad magic, index past the end, bytes that
  are not an image); ``--skip-corrupt`` skips such records, counts them and leaves them out of
  the lists; ``--verify`` also decodes every image to catch corrupt JPEG/PNG data.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

if __package__ in (None, ""):  # run as `python tools/rec2img.py` from a checkout
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _root not in sys.path:
        sys.path.insert(0, _root)

from hfsoftmax.data.filelist import split_train_val, write_list  # noqa: E402
from hfsoftmax.data.image import CorruptImageError, decode_image  # noqa: E402
from hfsoftmax.data.insightface import InsightFaceRecDataset  # noqa: E402
from hfsoftmax.data.recordio import RecordIOError, image_format  # noqa: E402

logger = logging.getLogger("rec2img")

_DS: InsightFaceRecDataset | None = None  # per worker process


def _raw(img):
    return img


def _open(in_folder: str, split: str) -> InsightFaceRecDataset:
    return InsightFaceRecDataset(in_folder, transform=_raw, split=split, image_size=None)


def _init_worker(in_folder: str, split: str) -> None:
    global _DS
    _DS = _open(in_folder, split)


def _extract(task):
    """Extract the images ``indices``; returns (index, rel, label, status, message) tuples,
    status one of 'written', 'exists', 'corrupt'."""
    out_folder, indices, skip_corrupt, verify = task
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
            if os.path.getsize(path) == len(data):
                results.append((i, rel, label, "exists", None))
                continue
        except OSError:
            pass
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # a partial file never exists under the final name
        results.append((i, rel, label, "written", None))
    return results


def run(in_folder: str, out_folder: str, *, split: str = "train", val_ratio: float = 0.0,
        seed: int = 0, workers: int = 1, skip_corrupt: bool = False, verify: bool = False,
        progress: bool = True, chunk: int = 256) -> dict:
    """Extract ``in_folder``'s ``<split>.rec`` into ``out_folder``; returns counts."""
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    ds = _open(in_folder, split)
    os.makedirs(out_folder, exist_ok=True)
    tasks = [(out_folder, list(range(s, min(len(ds), s + chunk))), skip_corrupt, verify)
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
    write_list(os.path.join(out_folder, "train.lst"), train)
    write_list(os.path.join(out_folder, "val.lst"), val)
    counts.update(images=len(ds), train=len(train), val=len(val), num_classes=ds.num_classes,
                  seconds=round(time.perf_counter() - t0, 3))
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        counts = run(args.in_folder, args.out_folder, split=args.split,
                     val_ratio=args.val_ratio, seed=args.seed, workers=args.workers,
                     skip_corrupt=args.skip_corrupt, verify=args.verify,
                     progress=not args.no_progress)
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
