"""InsightFace's training-set layout on top of indexed RecordIO (MS1M-ArcFace, Glint360K, ...).

A folder holds ``train.rec``, ``train.idx`` and ``property`` (``num_classes,height,width``):

- record 0: header ``flag=2``, ``label=[first_identity_record, end_identity_records]``;
- records ``1 .. first_identity_record-1``: one encoded image each (JPEG or PNG), label the
  class id as a float, or (newer sets) an array label whose first value is the class id;
- records ``first_identity_record .. end_identity_records-1``: one per identity, empty
  payload, ``label=[a, b]``: the half-open range of that identity's image records.

Sets without the identity records (record 0 with ``flag=0``) are read as "every key in the
index is an image", as InsightFace's own loader does.

Every count a file claims is checked against what the files can hold before anything of that
size is built: record 0's image and identity counts against the .rec's size (a record takes
at least 8 + 24 bytes) and the .idx; ``property``'s class count against :data:`MAX_CLASSES`
and, where the set is sorted by identity, against the last image's label.

>>> ds = InsightFaceRecDataset("datasets/data/synthetic", transform=train_transform())
>>> image, label = ds[0]; ds.num_classes
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np

from .image import CorruptImageError, SkipCounter, SkipsCorrupt, decode_image, IMAGE_SIZE
from .recordio import IR_SIZE, MIN_RECORD, RecordIOError, RecordIOReader, unpack

__all__ = ["InsightFaceRecDataset", "RecLayout", "read_property", "read_layout", "MAX_CLASSES"]

logger = logging.getLogger(__name__)

#: Most classes a set may declare (int32 class ids; 200x the largest public face sets). More
#: classes than images is allowed (``property`` may count identities with no image here).
MAX_CLASSES = 2 ** 31
#: Largest image side ``property`` may declare (JPEG's own limit).
MAX_SIDE = 65535
# an image record: frame header + IRHeader; record 0 and identity records add 2 float32 labels
_MIN_IMAGE_RECORD = MIN_RECORD + IR_SIZE
_MIN_RANGE_RECORD = _MIN_IMAGE_RECORD + 8


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """``property`` file -> (num_classes, height, width), each bounded (:data:`MAX_CLASSES`,
    :data:`MAX_SIDE`): the class count sizes the classifier, so 1e14 must not get through."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(4097).strip()
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
    num_classes, height, width = fields
    if num_classes > MAX_CLASSES:
        raise ValueError(f"{path}: num_classes {num_classes} is above the cap of {MAX_CLASSES} "
                         "(2**31) classes; the file is corrupt or not this set's property "
                         "(fix it to the number of identities)")
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"{path}: image size {height}x{width} is above {MAX_SIDE} pixels a "
                         "side; expected 'num_classes,height,width' such as '85742,112,112'")
    return num_classes, height, width


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


def _class_id(header, where: str) -> int:
    """The image's class id, refused unless a whole number in [0, MAX_CLASSES)."""
    label = _label_of(header, where)
    if not (label.is_integer() and 0 <= label < MAX_CLASSES):
        raise RecordIOError(f"{where}: label {label} is not a class id (a whole number in "
                            f"0..{MAX_CLASSES - 1})")
    return int(label)


def read_layout(reader: RecordIOReader) -> RecLayout:
    """Work out which keys are images and which are identity records from record 0.

    Record 0's claims are checked before any list of that size is built: its images must be
    in the index, and its images and identity records must fit in the .rec's size.
    """
    if not reader.keys:
        raise RecordIOError(f"{reader.idx_path}: the index is empty")
    first_key = 0 if 0 in reader._offsets else reader.keys[0]
    header, body = unpack(reader.read_idx(first_key), where=f"record {first_key} of "
                          f"{reader.rec_path}")
    # the layout header is record 0 with an array label and no image (an image record 0
    # with an array label belongs to a flat set)
    if first_key == 0 and header.flag >= 2 and not body:
        fa, fb = float(header.label[0]), float(header.label[1])
        if not (fa.is_integer() and fb.is_integer() and 1 <= fa <= fb):
            raise RecordIOError(f"record 0 of {reader.rec_path}: identity range [{fa}, {fb}) is "
                                "invalid (expected whole numbers 1 <= a <= b)")
        a, b = int(fa), int(fb)
        num_images, num_ids = a - 1, b - a
        if num_images > len(reader.keys) - 1:
            raise RecordIOError(
                f"record 0 of {reader.rec_path} claims {num_images} images (keys 1..{a - 1}) "
                f"but {reader.idx_path} lists only {len(reader.keys)} keys in all: the .idx "
                "is truncated or record 0 is corrupt")
        need = _MIN_RANGE_RECORD * (1 + num_ids) + _MIN_IMAGE_RECORD * num_images
        rec_size = reader.size
        if need > rec_size:
            raise RecordIOError(
                f"record 0 of {reader.rec_path} claims {num_images} images and {num_ids} "
                f"identities, which take at least {need} bytes ({_MIN_IMAGE_RECORD} per image "
                f"record, {_MIN_RANGE_RECORD} per identity record), but the .rec has "
                f"{rec_size} bytes: the file is truncated or record 0 is corrupt")
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
            self._check_last_label(prop)
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

    def _check_last_label(self, prop: str) -> None:
        """Refuse a ``property`` whose class count is not above the last image's label.

        In a set with identity records the images are stored identity by identity, so the
        last image carries the largest label: one record read checks the count against the
        data. Other sets are checked image by image as they are read (:meth:`read_raw`). A
        last record that cannot be read is left to that per-read check (and --skip-corrupt).
        """
        if self.layout.identity_keys is None or not self.keys:
            return
        key = self.keys[-1]
        try:
            header, _ = unpack(self.reader.read_idx(key), where=self._where(key))
            label = _label_of(header, self._where(key))
        except (RecordIOError, KeyError):
            return
        if label >= self.num_classes:
            raise ValueError(f"{prop}: num_classes {self.num_classes} is not above the largest "
                             f"label {label:.0f} (record {key}, the last image of "
                             f"{self.reader.rec_path}); labels must be < num_classes: fix "
                             f"'property' to at least {label + 1:.0f} classes")

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
            out[i] = _class_id(header, where)
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
