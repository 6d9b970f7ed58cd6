"""Datasets of uint8 pixels: decoding in the loader, everything else on the device.

The loader's workers only read and decode (:func:`~hfsoftmax.data.image.decode_uint8`); the
batch travels as uint8 (a quarter of float32's bytes, through pinned memory) and is flipped
and normalised where the model runs (:func:`~hfsoftmax.data.transforms.normalize_batch`).
On the CPU the normalisation cost 0.42 ms an image a core and a collate of 256 float images
33 ms (issue 29); a GPU does both in microseconds.

>>> ds = Uint8Images(InsightFaceRecDataset("datasets/data/synthetic"), decoder="torchvision")
>>> loader = DataLoader(ds, batch_sampler=ShardedBatchSampler(...), collate_fn=collate_uint8)
>>> images, labels, flips = next(iter(loader))    # (B, 112, 112, 3) uint8, int64, bool
"""
from __future__ import annotations

import torch

from .image import DECODERS, IMAGE_SIZE, decode_uint8

__all__ = ["Uint8Images", "collate_uint8"]


class Uint8Images(torch.utils.data.Dataset):
    """Wraps a dataset with ``read_raw(index) -> (bytes, label)`` (InsightFace ``.rec``, an
    image list). Items are fetched by index, or by ``(index, flip)`` as
    :class:`~hfsoftmax.engine.data.ShardedBatchSampler` yields them; an item is
    ``(uint8 (H, W, 3) tensor, label, flip)`` (the flip is applied on the device)."""

    def __init__(self, base, decoder: str = "torchvision",
                 size: tuple[int, int] | None = IMAGE_SIZE):
        if not hasattr(base, "read_raw"):
            raise ValueError(f"{type(base).__name__} has no read_raw(index); Uint8Images "
                             "wraps InsightFaceRecDataset and ImageListDataset")
        if decoder not in DECODERS:
            raise ValueError(f"Unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
        self.base, self.decoder, self.size = base, decoder, size
        self.num_classes = getattr(base, "num_classes", None)
        self._resized = [False]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        data, label = self.base.read_raw(index)
        where = self.base._where(self.base.keys[index]) if hasattr(self.base, "keys") \
            else self.base._where(index)
        return decode_uint8(data, where, self.size, self.decoder, self._resized), label, \
            bool(flip)


def collate_uint8(batch):
    """``[(image, label, flip), ...]`` -> ``(images (B, H, W, 3) uint8, labels int64,
    flips bool)``."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    flips = torch.tensor([b[2] for b in batch], dtype=torch.bool)
    return images, labels, flips
