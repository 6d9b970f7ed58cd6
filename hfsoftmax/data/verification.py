"""Face-verification pair files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``): safe loading.

A ``.bin`` is the pickle of ``(bins, issame_list)``: ``bins`` holds 2*P encoded images (pair i
is ``bins[2i]``, ``bins[2i+1]``) and ``issame_list`` P bools. InsightFace's files were written
by Python 2 (``cPickle``, protocol 2), so the images are Python 2 ``str``; plain
``pickle.load`` in Python 3 fails on them, and, worse, runs whatever code a downloaded file
holds. :func:`load_bin` uses a restricted unpickler instead:

- ``encoding="bytes"`` turns Python 2 ``str`` into ``bytes``;
- no global can be loaded (``find_class`` refuses every module.name), so REDUCE/BUILD/INST
  opcodes cannot call anything; the single exception is ``_codecs.encode``, which Python 3
  itself emits for ``bytes`` at protocol 2, mapped to a local latin-1 encoder that can only
  turn a str into bytes;
- the result must be lists/tuples of bytes and bools: ``(bins, issame)`` with
  ``len(bins) == 2 * len(issame)``.

>>> bins, issame = load_bin("lfw.bin")
>>> images = decode_pairs(bins)          # uint8 (2P, 112, 112, 3)
"""
from __future__ import annotations

import io
import os
import pickle
import struct
from typing import Sequence

from ..fileio import atomic_write

__all__ = ["UnsafePickleError", "load_bin", "loads_bin", "dump_bin", "decode_pairs"]


class UnsafePickleError(pickle.UnpicklingError):
    """A .bin tried to load a global (code); nothing was executed."""


def _latin1_encode(obj, encoding="latin1"):
    # What Python 3 pickles a bytes object as at protocol <= 2: _codecs.encode(str, 'latin1').
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode is only admitted as encode(str, 'latin1') "
                                f"(how Python 3 pickles bytes); got encode({type(obj).__name__},"
                                f" {encoding!r})")
    return obj.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module, name):
        mod = module.decode() if isinstance(module, bytes) else module
        nm = name.decode() if isinstance(name, bytes) else name
        if (mod, nm) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickleError(
            f"{self._source}: refused to load global {mod}.{nm}: a verification .bin may only "
            "hold lists, tuples, byte strings, bools and ints (this file would run code when "
            "loaded; it is not a genuine InsightFace .bin or it was written with numpy "
            "objects: re-save bins as bytes and issame as a list of bools)")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed in a .bin")


def _validate(obj, source: str) -> tuple[list[bytes], list[bool]]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{source}: expected a pickled (bins, issame_list) pair, got "
                         f"{type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(f"{source}: bins and issame_list must be lists, got "
                         f"{type(bins).__name__} and {type(issame).__name__}")
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray)):
            raise ValueError(f"{source}: bins[{i}] is a {type(b).__name__}, expected the "
                             "encoded image bytes")
    out_same = []
    for i, s in enumerate(issame):
        if isinstance(s, bool) or (isinstance(s, int) and s in (0, 1)):
            out_same.append(bool(s))
        else:
            raise ValueError(f"{source}: issame_list[{i}] is {s!r}, expected a bool")
    if len(bins) != 2 * len(out_same):
        raise ValueError(f"{source}: {len(bins)} images for {len(out_same)} pairs; a .bin holds "
                         "exactly 2 images per pair")
    return [bytes(b) for b in bins], out_same


def loads_bin(data: bytes, source: str = "<bytes>") -> tuple[list[bytes], list[bool]]:
    """:func:`load_bin` for bytes already in memory."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - no code ran (no globals); any failure = bad file
        raise ValueError(f"{source}: not a readable verification .bin pickle ({e})") from None
    return _validate(obj, source)


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Load ``(bins, issame_list)`` from a verification ``.bin`` without running any code.

    Works for Python 2 pickles (InsightFace's files) and Python 3 ones; raises
    :class:`UnsafePickleError` naming the refused ``module.name`` for anything that is not
    plain lists/tuples of bytes and bools.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"verification pair file not found: {path}") from None
    return loads_bin(data, source=path)


def _p2_bytes(b: bytes) -> bytes:
    # Python 2 str opcodes: SHORT_BINSTRING ('U', 1-byte length) / BINSTRING ('T', 4-byte).
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<I", len(b)) + b


def dump_bin(path: str | os.PathLike, bins: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a ``.bin`` exactly in the layout of InsightFace's Python 2 files.

    The pickle opcodes are emitted directly: protocol 2, images as Python 2 ``str``
    (BINSTRING), bools as NEWTRUE/NEWFALSE, the objects ``cPickle.dump((bins, issame), f,
    protocol=2)`` wrote (without its unused memo puts), so the file loads in
    Python 2, in Python 3 with ``encoding="bytes"``, and with :func:`load_bin`. Atomic write.
    """
    bins = [bytes(b) for b in bins]
    issame = [bool(s) for s in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{len(bins)} images for {len(issame)} pairs: need exactly 2 per pair")
    out = io.BytesIO()
    out.write(b"\x80\x02")           # PROTO 2
    out.write(b"]")                  # EMPTY_LIST (bins)
    for start in range(0, len(bins), 1000):  # batch appends as cPickle does
        out.write(b"(")              # MARK
        for b in bins[start:start + 1000]:
            out.write(_p2_bytes(b))
        out.write(b"e")              # APPENDS
    out.write(b"]")                  # EMPTY_LIST (issame)
    for start in range(0, len(issame), 1000):
        out.write(b"(")
        out.write(b"".join(b"\x88" if s else b"\x89" for s in issame[start:start + 1000]))
        out.write(b"e")
    out.write(b"\x86.")              # TUPLE2, STOP
    with atomic_write(path) as f:
        f.write(out.getvalue())


def decode_pairs(bins: Sequence[bytes], image_size: tuple[int, int] = (112, 112),
                 source: str = "bins"):
    """Decode the encoded images to a uint8 array ``(2P, H, W, 3)`` (RGB).

    ``image_size`` is (height, width); images of another size are resized (bilinear).
    Normalise with :func:`hfsoftmax.data.transforms.normalize_uint8`.
    """
    import numpy as np

    from .image import decode_image

    h, w = image_size
    out = np.empty((len(bins), h, w, 3), dtype=np.uint8)
    for i, b in enumerate(bins):
        out[i] = np.asarray(decode_image(b, f"{source}[{i}]", (w, h)))
    return out
