"""Image folders (``DIR/<class>/<image>``): the one rule that turns one into labelled items,
shared by the trainer's ``--train-folder`` and ``tools/img2rec.py``.

- Classes are the sub-folders of ``DIR``. Where every class name is a decimal number they are
  ordered by that number (``2`` before ``10``: a folder written by ``tools/rec2img.py``, whose
  class folders are the labels, gets its labels back); otherwise by name (code-point order,
  independent of the locale). Label ``i`` is the ``i``-th class.
- A class's images are its files with an image extension (jpg, jpeg, png, bmp, webp; any
  case), not its sub-folders; ordered the same way by file stem (numbers numerically where
  every stem is a number, else by name). Other files are skipped and counted.
- A class folder without images keeps its label (so labels stay those of the folder names);
  it is logged.

>>> items, classes = scan_image_folder("faces")     # [("alice/0001.jpg", 0), ...], ["alice", ...]
>>> ds = ImageFolderDataset("faces")
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from .filelist import ImageListDataset
from .image import IMAGE_SIZE

__all__ = ["IMAGE_EXTENSIONS", "scan_image_folder", "ImageFolderDataset", "natural_order"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def natural_order(names: list[str], key=lambda n: n) -> list[str]:
    """``names`` by number where every ``key(name)`` is a decimal number, else by name."""
    keys = [key(n) for n in names]
    if names and all(k.isdigit() and k.isascii() for k in keys):
        return [n for _, _, n in sorted(zip((int(k) for k in keys), keys, names))]
    return [n for _, n in sorted(zip(keys, names))]


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """``(items, classes)``: ``(relative path, label)`` of every image in class order, and
    the class folder names (``classes[label]``). Raises ``ValueError`` for a folder without
    class sub-folders or without any image."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    with os.scandir(root) as it:
        classes = natural_order([e.name for e in it if e.is_dir()])
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class>/<image> "
                         f"files ({', '.join(IMAGE_EXTENSIONS)})")
    items: list[tuple[str, int]] = []
    empty, skipped = [], 0
    for label, name in enumerate(classes):
        with os.scandir(os.path.join(root, name)) as it:
            files = [e.name for e in it if e.is_file()]
        images = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        skipped += len(files) - len(images)
        if not images:
            empty.append(name)
        for f in natural_order(images, key=lambda n: os.path.splitext(n)[0]):
            items.append((f"{name}/{f}", label))
    if not items:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                         f"{len(classes)} class folder(s)")
    if skipped:
        logger.warning("%s: %d file(s) without an image extension skipped", root, skipped)
    if empty:
        logger.warning("%s: %d class folder(s) without images keep their labels (first: %r)",
                       root, len(empty), empty[0])
    return items, classes


class ImageFolderDataset(ImageListDataset):
    """``(transform(image), label)`` of an image folder (:func:`scan_image_folder`);
    ``classes[label]`` is the folder name of a label."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, *,
                 num_classes: int | None = None, skip_corrupt: bool = False,
                 image_size: tuple[int, int] | None = IMAGE_SIZE):
        items, self.classes = scan_image_folder(root)
        super().__init__(items, root, transform,
                         num_classes=len(self.classes) if num_classes is None else num_classes,
                         skip_corrupt=skip_corrupt, image_size=image_size)
