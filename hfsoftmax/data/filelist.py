"""Image-list datasets (``relative/path label`` lines plus a prefix folder) and the
deterministic train/val split used by ``tools/rec2img.py`` and ``tools/split_train_val.py``.

>>> ds = ImageListDataset("images/train.lst", prefix="images", transform=train_transform())
>>> image, label = ds[0]; ds.num_classes
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from ..fileio import atomic_write

from .image import CorruptImageError, SkipCounter, SkipsCorrupt, decode_image, IMAGE_SIZE

__all__ = ["read_list", "write_list", "split_train_val", "ImageListDataset"]

logger = logging.getLogger(__name__)


def read_list(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Parse ``relative/path label`` lines (the path may contain spaces; the label is the last
    field, a non-negative integer). Blank lines and ``#`` comments are ignored."""
    path = os.fspath(path)
    items = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"image list not found: {path}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError
                label = int(parts[1])
                if label < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'relative/path label' with a "
                                 f"non-negative integer label, got {line[:100]!r}") from None
            items.append((parts[0], label))
    return items


def write_list(path: str | os.PathLike, items: Iterable[tuple[str, int]]) -> None:
    """Write ``relative/path label`` lines atomically (temp file, fsync, rename)."""
    with atomic_write(path, "w") as f:
        for rel, label in items:
            f.write(f"{rel} {int(label)}\n")


def _split_key(seed: int, rel: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{rel}".encode(), digest_size=8).digest()


def split_train_val(items: Sequence[tuple[str, int]], val_ratio: float, seed: int = 0
                    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic per-class split of ``(path, label)`` items.

    Within each class the items are ordered by a seeded hash of their path
    (blake2b of ``"<seed>\\0<path>"``) and the first ``round(val_ratio * n)`` go to val, capped
    at ``n - 1`` so every class keeps at least one training image. The result depends only on
    the seed and the set of paths (not on their order, the machine or the worker count), and
    both lists keep the input order.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, (rel, label) in enumerate(items):
        by_class[label].append(i)
    val_idx: set[int] = set()
    for label, idxs in by_class.items():
        n_val = min(int(val_ratio * len(idxs) + 0.5), len(idxs) - 1)
        if n_val > 0:
            ranked = sorted(idxs, key=lambda i: _split_key(seed, items[i][0]))
            val_idx.update(ranked[:n_val])
    train = [it for i, it in enumerate(items) if i not in val_idx]
    val = [it for i, it in enumerate(items) if i in val_idx]
    return train, val


class ImageListDataset(SkipsCorrupt):
    """Map-style dataset over an image list: ``(transform(image), label)``.

    Paths are relative to ``prefix`` (default: the list file's folder). Labels must be
    0..C-1; ``num_classes`` is ``max(label) + 1`` unless given (then labels are checked
    against it). A missing or undecodable file raises an error naming it and the list line;
    ``skip_corrupt=True`` returns ``None`` for it instead (use
    :func:`~hfsoftmax.data.image.skip_none_collate`) and counts it in :attr:`num_skipped`.
    """

    def __init__(self, filelist: str | os.PathLike | Sequence[tuple[str, int]],
                 prefix: str | os.PathLike | None = None,
                 transform: Callable | None = None, *, num_classes: int | None = None,
                 skip_corrupt: bool = False,
                 image_size: tuple[int, int] | None = IMAGE_SIZE):
        if isinstance(filelist, (str, os.PathLike)):
            self.filelist = os.fspath(filelist)
            items = read_list(self.filelist)
        else:  # (relative path, label) items already read (an image folder's scan)
            if prefix is None:
                raise ValueError("ImageListDataset of items needs the folder (prefix) they "
                                 "are relative to")
            self.filelist, items = os.fspath(prefix), list(filelist)
        self.prefix = os.fspath(prefix) if prefix is not None else os.path.dirname(
            os.path.abspath(self.filelist))
        if not os.path.isdir(self.prefix):
            raise FileNotFoundError(f"image folder (prefix) not found: {self.prefix}")
        self.items = items
        if not self.items:
            raise ValueError(f"{self.filelist}: the image list is empty")
        max_label = max(label for _, label in self.items)
        if num_classes is None:
            num_classes = max_label + 1
        elif max_label >= num_classes:
            raise ValueError(f"{self.filelist}: label {max_label} >= num_classes={num_classes}")
        self.num_classes = int(num_classes)
        if transform is None:
            from .transforms import eval_transform
            transform = eval_transform()
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.image_size = image_size
        self._skips = SkipCounter(self.filelist) if skip_corrupt else None
        self._resized = [False]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def _where(self, index: int) -> str:
        return f"{os.path.join(self.prefix, self.items[index][0])} (entry {index} of " \
               f"{self.filelist})"

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """The file's bytes (verbatim) and the class id of the ``index``-th entry."""
        rel, label = self.items[index]
        try:
            with open(os.path.join(self.prefix, rel), "rb") as f:
                return f.read(), label
        except OSError as e:
            raise CorruptImageError(f"{self._where(index)}: cannot read: {e.strerror}"
                                    ) from None

    def __getitem__(self, index: int):
        where = self._where(index)
        try:
            data, label = self.read_raw(index)
            img = decode_image(data, where, self.image_size, self._resized)
        except CorruptImageError as e:
            if not self.skip_corrupt:
                raise
            self._skips.add(e)
            return None
        return self.transform(img), label
