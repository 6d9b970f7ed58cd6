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
- before anything is unpickled, the opcodes are walked once (:func:`check_pickle_size`) to
  bound what loading would build: a pickle can store one byte string once and reference it
  from its memo thousands of times (a 1 MiB file that decodes to gigabytes once every
  reference is decoded as an image), or spend one byte per new list; the estimate counts
  every memo reference of a byte string as a copy and must stay within
  :data:`MAX_AMPLIFICATION` x the file's size (+ :data:`SIZE_SLACK`);
- the result must be lists/tuples of bytes and bools: ``(bins, issame)`` with
  ``len(bins) == 2 * len(issame)`` and at most :data:`MAX_PAIRS` pairs.

>>> bins, issame = load_bin("lfw.bin")
>>> images = decode_pairs(bins)          # uint8 (2P, 112, 112, 3)
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from typing import Sequence

from ..fileio import atomic_write

__all__ = ["UnsafePickleError", "load_bin", "loads_bin", "dump_bin", "decode_pairs",
           "check_pickle_size", "MAX_AMPLIFICATION", "SIZE_SLACK", "MAX_PAIRS"]

#: What loading a .bin may build, as a multiple of the file's size (plus SIZE_SLACK). A genuine
#: file stores each image once, so it builds about 1x (Python 3's protocol-2 pickles, which
#: keep a str and a bytes copy of each image, about 1.4x).
MAX_AMPLIFICATION = 4
#: Allowance on top, so that tiny files (tests, a few pairs) need not be exactly 1:1.
SIZE_SLACK = 1 << 20
#: Most pairs a .bin may hold: InsightFace's sets have 5,000 to 7,000; this is 150x that.
MAX_PAIRS = 1 << 20


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
            # a fresh function per file: BUILD could otherwise set attributes (__defaults__)
            # on a function that every later load shares
            def encode(obj, encoding="latin1"):
                return _latin1_encode(obj, encoding)
            return encode
        raise UnsafePickleError(
            f"{self._source}: refused to load global {mod}.{nm}: a verification .bin may only "
            "hold lists, tuples, byte strings, bools and ints (this file would run code when "
            "loaded; it is not a genuine InsightFace .bin or it was written with numpy "
            "objects: re-save bins as bytes and issame as a list of bools)")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed in a .bin")


# -- what loading would build, from the opcodes alone ---------------------------------------
# Bytes charged: a new object _OBJ (+ its length for a str/bytes), one more reference to an
# existing object _REF, except that a reference to a str/bytes is charged as a copy (_OBJ +
# its length): whoever decodes bins[i] decodes every reference separately.
_OBJ, _REF = 64, 8
# a container's size is what it holds (for a call on it); capped, as a GET of a container
# is cheap, so sizes could double per nested TUPLE2 and grow into huge integers
_SIZE_CAP = 1 << 62
_NEW_LEAF = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES",
                       "BINBYTES8", "BYTEARRAY8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                       "BINUNICODE8"})
_NEW_ATOM = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT",
                       "BINFLOAT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET",
                       "EXT1", "EXT2", "EXT4", "GLOBAL", "PERSID", "NEXT_BUFFER"})
_SINGLETON = frozenset({"NONE", "NEWTRUE", "NEWFALSE"})
_NOOP = frozenset({"PROTO", "FRAME", "STOP", "READONLY_BUFFER"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
# pop n (or up to the mark) and keep the container below: list.append, dict[k] = v, BUILD
_INTO = {"APPEND": 1, "SETITEM": 2, "BUILD": 1, "APPENDS": None, "SETITEMS": None,
         "ADDITEMS": None}
# pop n (or up to the mark), push a new container of them
_CONTAINER = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "TUPLE": None, "LIST": None,
              "DICT": None, "FROZENSET": None}
# pop n (or up to the mark), push a call's result: sized as what it consumed, since
# _codecs.encode(str) turns a str into bytes of its length
_CALL = {"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3, "STACK_GLOBAL": 2, "BINPERSID": 1,
         "OBJ": None, "INST": None}


class _TooLarge(ValueError):
    """The size refusal (kept apart from the "not readable" wrapping below)."""


def check_pickle_size(data: bytes, source: str = "<bytes>") -> int:
    """Refuse a pickle that would build far more than its own size; return the estimate.

    Walks the opcodes (:func:`pickletools.genops`, nothing is built) with a model of the
    unpickler's stack and memo. Each stack entry is ``(is_str_or_bytes, size)``; every GET of
    a byte string counts its size again. After each opcode the running total must stay within
    ``MAX_AMPLIFICATION * bytes_read + SIZE_SLACK``, so a bomb is refused as soon as it
    starts to repeat itself, in time linear in the bytes read. Raises ``ValueError`` naming
    the file, the estimate and the bound (also for a pickle too broken to walk).
    """
    f = io.BytesIO(data)
    stack: list[tuple[bool, int]] = []
    metastack: list[list[tuple[bool, int]]] = []
    memo: dict[int, tuple[bool, int]] = {}
    total = 0

    def pop(n):
        if n is None:  # everything above the last MARK, and the MARK
            nonlocal stack
            if not metastack:
                raise ValueError("no MARK to pop to")
            items, stack = stack, metastack.pop()
            return items
        if len(stack) < n:
            raise ValueError("stack underflow")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    try:
        for op, arg, _ in pickletools.genops(f):
            name = op.name
            if name in _NEW_LEAF:
                stack.append((True, len(arg)))
                total += _OBJ + len(arg)
            elif name in _NEW_ATOM:
                stack.append((False, 0))
                total += _OBJ + (arg.bit_length() // 8 if isinstance(arg, int) else 0)
            elif name in _SINGLETON:
                stack.append((False, 0))
                total += _REF
            elif name in _GET or name == "DUP":
                if name == "DUP":
                    if not stack:
                        raise ValueError("DUP with nothing on the stack")
                    obj = stack[-1]
                elif arg in memo:
                    obj = memo[arg]
                else:
                    raise ValueError(f"memo key {arg} was never stored")
                stack.append(obj)
                total += _OBJ + obj[1] if obj[0] else _REF
            elif name in _PUT or name == "MEMOIZE":
                if not stack:
                    raise ValueError(f"{name} with nothing on the stack")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name == "MARK":
                metastack.append(stack)
                stack = []
            elif name == "POP":  # the unpickler pops the MARK when nothing is above it
                pop(1 if stack else None)
            elif name == "POP_MARK":
                pop(None)
            elif name in _INTO:
                pop(_INTO[name])
                if not stack:
                    raise ValueError(f"{name} with no container below")
            elif name in _CONTAINER:
                items = pop(_CONTAINER[name])
                stack.append((False, min(_SIZE_CAP, sum(size for _, size in items))))
                total += _OBJ
            elif name in _CALL:
                size = min(_SIZE_CAP, sum(s for _, s in pop(_CALL[name])))
                stack.append((True, size))
                total += _OBJ + size
            elif name not in _NOOP:
                raise ValueError(f"opcode {name} is not understood by this loader")
            bound = MAX_AMPLIFICATION * f.tell() + SIZE_SLACK
            if total > bound:
                raise _TooLarge(f"{source}: refused: loading this {len(data)}-byte pickle "
                                f"would build at least {total} bytes by byte {f.tell()} (each "
                                f"new object counted as {_OBJ} bytes, each memo reference to a"
                                " byte string as a copy), over the bound of "
                                f"{bound} bytes ({MAX_AMPLIFICATION} x the bytes read + "
                                f"{SIZE_SLACK}); a genuine verification .bin stores each image "
                                "once, this one repeats objects through pickle memo references"
                                " or builds many tiny ones, to inflate when loaded (re-save it "
                                "with hfsoftmax.data.verification.dump_bin)")
    except _TooLarge:
        raise
    except Exception as e:  # noqa: BLE001 - genops' and the model's complaints: a bad pickle
        raise ValueError(f"{source}: not a readable verification .bin pickle ({e})") from None
    return total


def _validate(obj, source: str) -> tuple[list[bytes], list[bool]]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{source}: expected a pickled (bins, issame_list) pair, got "
                         f"{type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(f"{source}: bins and issame_list must be lists, got "
                         f"{type(bins).__name__} and {type(issame).__name__}")
    if len(issame) > MAX_PAIRS:
        raise ValueError(f"{source}: {len(issame)} pairs, more than the {MAX_PAIRS} a "
                         "verification .bin may hold (InsightFace's sets have about 6,000); "
                         "split the set into several .bin files")
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
    check_pickle_size(data, source)
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
    plain lists/tuples of bytes and bools, and ``ValueError`` for a file that would build
    far more than its size when loaded (:func:`check_pickle_size`) or is malformed.
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
