"""InsightFace's training-set layout on top of indexed RecordIO (MS1M-ArcFace, Glint360K, ...).

A folder holds ``train.rec``, ``train.idx`` and ``property`` (``num_classes,height,width``):

- record 0: header ``flag=2``, ``label=[first_identity_record, end_identity_records]``;
- records ``1 .. first_identity_record-1``: one encoded image each (JPEG or PNG), label the
  class id as a float, or (newer sets) an array label whose first value is the class id;
- records ``first_identity_record .. end_identity_records-1``: one per identity, empty
  payload, ``label=[a, b]``: the half-open range of that identity's image records.

Sets without the identity records (record 0 with ``flag=0``) are read as "every key in the
index is an image", as InsightFace's own loader does.

>>> ds = InsightFaceRecDataset("datasets/data/synthetic", transform=train_transform())
>>> image, label = ds[0]; ds.num_classes
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np

from .image import CorruptImageError, SkipCounter, SkipsCorrupt, decode_image, IMAGE_SIZE
from .recordio import RecordIOError, RecordIOReader, unpack

__all__ = ["InsightFaceRecDataset", "RecLayout", "read_property", "read_layout"]

logger = logging.getLogger(__name__)


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """``property`` file -> (num_classes, height, width)."""
    try:
        text = open(path, encoding="ascii").read().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: an InsightFace folder has a 'property' "
                                "file 'num_classes,height,width'") from None
    try:
        fields = [int(x) for x in text.split(",")]
        if len(fields) != 3 or min(fields) <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' (positive integers), "
                         f"got {text[:80]!r}") from None
    return fields[0], fields[1], fields[2]


class RecLayout:
    """Image keys and identity ranges of an InsightFace ``.rec`` (see module docstring)."""

    def __init__(self, image_keys: list[int], identity_keys: range | None):
        self.image_keys = image_keys
        self.identity_keys = identity_keys


def _label_of(header, where: str) -> float:
    lab = header.label
    if header.flag > 0:
        if len(lab) == 0:
            raise RecordIOError(f"{where}: array label is empty")
        lab = lab[0]  # newer InsightFace sets: class id first
    return float(lab)


def read_layout(reader: RecordIOReader) -> RecLayout:
    """Work out which keys are images and which are identity records from record 0."""
    if not reader.keys:
        raise RecordIOError(f"{reader.idx_path}: the index is empty")
    first_key = 0 if 0 in reader._offsets else reader.keys[0]
    header, body = unpack(reader.read_idx(first_key), where=f"record {first_key} of "
                          f"{reader.rec_path}")
    # the layout header is record 0 with an array label and no image (an image record 0
    # with an array label belongs to a flat set)
    if first_key == 0 and header.flag >= 2 and not body:
        a, b = int(header.label[0]), int(header.label[1])
        if not 1 <= a <= b:
            raise RecordIOError(f"record 0 of {reader.rec_path}: identity range [{a}, {b}) is "
                                "invalid")
        image_keys = list(range(1, a))
        missing = [k for k in image_keys if k not in reader._offsets]
        if missing:
            raise RecordIOError(f"record 0 of {reader.rec_path} says images are keys 1..{a - 1} "
                                f"but {len(missing)} are missing from {reader.idx_path} "
                                f"(first: {missing[0]})")
        return RecLayout(image_keys, range(a, b))
    return RecLayout(list(reader.keys), None)


class InsightFaceRecDataset(SkipsCorrupt):
    """Map-style dataset over an InsightFace ``.rec`` folder: ``(image, label)`` pairs.

    ``transform`` maps the RGB PIL image (112x112) to what is returned; the default is
    :func:`~hfsoftmax.data.transforms.eval_transform` (float CHW tensor in [-1, 1]).
    ``split`` picks ``<split>.rec``/``<split>.idx`` (the synthetic set also has ``heldout``).
    A record that cannot be read or decoded raises an error naming it; with
    ``skip_corrupt=True`` such samples are returned as ``None`` instead (use
    :func:`~hfsoftmax.data.image.skip_none_collate`), counted in :attr:`num_skipped` (workers
    included) and logged; call :meth:`report_skipped` at the end of an epoch.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, *,
                 split: str = "train", skip_corrupt: bool = False,
                 image_size: tuple[int, int] | None = IMAGE_SIZE):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"InsightFace dataset folder not found: {self.root}")
        rec = os.path.join(self.root, f"{split}.rec")
        idx = os.path.join(self.root, f"{split}.idx")
        self.reader = RecordIOReader(rec, idx)
        self.layout = read_layout(self.reader)
        self.keys = self.layout.image_keys
        prop = os.path.join(self.root, "property")
        if os.path.isfile(prop):
            self.num_classes, h, w = read_property(prop)
        elif self.layout.identity_keys is not None:
            self.num_classes = len(self.layout.identity_keys)
            logger.warning("%s has no 'property' file: num_classes=%d from the identity records",
                           self.root, self.num_classes)
        else:
            self.num_classes = int(max(self.labels())) + 1
            logger.warning("%s has neither 'property' nor identity records: num_classes=%d "
                           "from a scan of the labels", self.root, self.num_classes)
        if (self.layout.identity_keys is not None
                and len(self.layout.identity_keys) != self.num_classes):
            logger.warning("%s: property says %d classes but record 0 lists %d identities",
                           self.root, self.num_classes, len(self.layout.identity_keys))
        if transform is None:
            from .transforms import eval_transform
            transform = eval_transform()
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.image_size = image_size
        self._skips = SkipCounter(rec) if skip_corrupt else None
        self._resized = [False]

    def __len__(self) -> int:
        return len(self.keys)

    def _where(self, key: int) -> str:
        return f"record {key} of {self.reader.rec_path}"

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """Stored image bytes (verbatim) and class id of the ``index``-th image."""
        key = self.keys[index]
        where = self._where(key)
        header, img = unpack(self.reader.read_idx(key), where=where)
        label = _label_of(header, where)
        if not label.is_integer() or not 0 <= label < self.num_classes:
            raise RecordIOError(f"{where}: label {label} is not a class id in "
                                f"0..{self.num_classes - 1} (num_classes from property)")
        return img, int(label)

    def __getitem__(self, index: int):
        try:
            data, label = self.read_raw(index)
            img = decode_image(data, self._where(self.keys[index]), self.image_size,
                               self._resized)
        except (RecordIOError, CorruptImageError) as e:
            if not self.skip_corrupt:
                raise
            self._skips.add(e)
            return None
        return self.transform(img), label

    def labels(self) -> np.ndarray:
        """Class id of every image (reads every record header; int64 array)."""
        out = np.empty(len(self.keys), dtype=np.int64)
        for i, key in enumerate(self.keys):
            where = self._where(key)
            header, _ = unpack(self.reader.read_idx(key), where=where)
            out[i] = int(_label_of(header, where))
        return out

    def identity_ranges(self) -> list[tuple[int, int]]:
        """Half-open ``[a, b)`` image-record ranges of each identity, from identity records."""
        if self.layout.identity_keys is None:
            raise RecordIOError(f"{self.reader.rec_path} has no identity records (record 0 "
                                "has flag=0)")
        out = []
        for key in self.layout.identity_keys:
            where = self._where(key)
            header, _ = unpack(self.reader.read_idx(key), where=where)
            if header.flag < 2:
                raise RecordIOError(f"{where}: identity record without a [a, b) range label")
            out.append((int(header.label[0]), int(header.label[1])))
        return out
