"""Image decoding shared by the datasets, and the skip-and-count policy for corrupt samples.

Decoding is PIL's (``Image.open(io.BytesIO(b)).convert("RGB")``) for the PIL-image datasets;
:func:`decode_uint8` gives the uint8 pixels the training and extraction loaders send to the
device, decoded by ``torchvision.io.decode_jpeg`` (measured faster than PIL here:
``benchmarks/data_throughput.py``; other formats through ``torchvision.io.decode_image``)
or by PIL. Images whose size differs from the expected 112x112 are resized (bilinear, PIL)
and this is logged once per dataset: the InsightFace sets are already aligned 112x112
crops, so a resize usually means the wrong data.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
from typing import Any

from PIL import Image

__all__ = ["CorruptImageError", "decode_image", "decode_uint8", "DECODERS", "SkipCounter",
           "skip_none_collate"]

#: ``decode_uint8`` backends
DECODERS = ("torchvision", "pil")

logger = logging.getLogger(__name__)

IMAGE_SIZE = (112, 112)  # (width, height) of InsightFace's aligned crops


class CorruptImageError(ValueError):
    """Image bytes that PIL cannot decode; the message names the record or file."""


def decode_image(data: bytes, where: str, size: tuple[int, int] | None = IMAGE_SIZE,
                 warn_resize: list | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image of ``size`` (w, h).

    ``where`` names the sample in errors ("record 17 of /data/train.rec"). When the decoded
    size differs from ``size`` the image is resized; the first such resize is logged if
    ``warn_resize`` (a one-element list used as a flag) is given.
    """
    if not data:
        raise CorruptImageError(f"{where}: empty image payload")
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB")  # forces the full decode, so truncated data fails here
    except Exception as e:  # noqa: BLE001 - any failure to decode means corrupt bytes
        raise CorruptImageError(f"{where}: undecodable image ({len(data)} bytes, starts "
                                f"{bytes(data[:4]).hex()}): {e}") from None
    if size is not None and img.size != tuple(size):
        if warn_resize is not None and not warn_resize[0]:
            warn_resize[0] = True
            logger.warning("%s: image is %dx%d, resizing to %dx%d (further resizes in this "
                           "dataset are not logged)", where, img.size[0], img.size[1], *size)
        img = img.resize(tuple(size), Image.BILINEAR)
    return img


def decode_uint8(data: bytes, where: str, size: tuple[int, int] | None = IMAGE_SIZE,
                 decoder: str = "torchvision", warn_resize: list | None = None):
    """Encoded image bytes -> uint8 RGB pixels, a (H, W, 3) tensor (HWC: a batch of them
    becomes a channels-last NCHW tensor by a permutation alone).

    ``decoder``: ``torchvision`` (``torchvision.io``: JPEG through libjpeg-turbo, PNG too) or
    ``pil``; both give the same pixels for JPEG here (libjpeg-turbo, the same upsampling).
    Anything not ``size`` is resized by :func:`decode_image` (PIL, bilinear)."""
    import numpy as np
    import torch

    if decoder not in DECODERS:
        raise ValueError(f"Unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    if decoder == "torchvision" and data:
        from torchvision.io import ImageReadMode, decode_image as tv_decode, decode_jpeg

        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            img = decode_jpeg(buf, mode=ImageReadMode.RGB) if data[:2] == b"\xff\xd8" \
                else tv_decode(buf, mode=ImageReadMode.RGB)
        except Exception:  # noqa: BLE001 - undecodable here: PIL names the fault
            img = None
        if img is not None and img.dim() == 3 and img.shape[0] == 3 and (
                size is None or (img.shape[2], img.shape[1]) == tuple(size)):
            return img.permute(1, 2, 0)
    pil = decode_image(data, where, size, warn_resize)
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy())


class SkipCounter:
    """Counts skipped corrupt samples across DataLoader worker processes.

    Backed by a ``multiprocessing.Value`` inherited by workers (fork or spawn), so the parent's
    :attr:`count` includes what the workers skipped.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._value = multiprocessing.Value("q", 0)
        self._logged = 0

    def add(self, err: Exception) -> None:
        """Count one skipped sample; the first 10 are logged with their reason."""
        with self._value.get_lock():
            self._value.value += 1
            n = self._value.value
        if n <= 10:
            logger.warning("skipping corrupt sample (%d so far in %s): %s", n, self.owner, err)

    @property
    def count(self) -> int:
        return int(self._value.value)

    def report(self) -> int:
        """Log the total (call at the end of an epoch); returns it."""
        n = self.count
        if n:
            logger.warning("%s: skipped %d corrupt sample(s) in total", self.owner, n)
        else:
            logger.info("%s: no corrupt samples skipped", self.owner)
        return n


def skip_none_collate(batch: list[Any]):
    """``collate_fn`` for datasets built with ``skip_corrupt=True``: drops skipped samples
    (returned as ``None``) and collates the rest with torch's default collate."""
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return default_collate(kept)


class SkipsCorrupt:
    """What a dataset with ``skip_corrupt`` exposes: its :class:`SkipCounter` (``self._skips``,
    None when corrupt samples raise) read as ``num_skipped`` and logged by ``report_skipped``."""

    _skips: SkipCounter | None = None

    @property
    def num_skipped(self) -> int:
        """Corrupt samples skipped so far (0 unless ``skip_corrupt=True``)."""
        return self._skips.count if self._skips is not None else 0

    def report_skipped(self) -> int:
        """Log and return the number of corrupt samples skipped so far."""
        return self._skips.report() if self._skips is not None else 0
