"""MXNet's indexed RecordIO (``.rec`` + ``.idx``) in pure Python: reader and writer.

The one place in the project that knows the byte layout (InsightFace's training sets,
MS1M-ArcFace, Glint360K, WebFace, are stored this way; MXNet itself is not a dependency).

Framing of one record in ``.rec`` (little endian, as dmlc-core's ``RecordIOWriter``)::

    uint32 magic = 0xced7230a
    uint32 lrec  = cflag << 29 | length      # cflag: 0 whole, 1 first, 2 middle, 3 last part
    length bytes of payload, then zero padding to a multiple of 4 bytes

A payload is split into parts wherever the magic word occurs at a 4-byte aligned position
inside it (the word itself is dropped and re-inserted by the reader), so a reader that ignores
``cflag`` silently corrupts such records. ``.idx`` holds ``key\\toffset`` lines; a key's
offset points at the first part's magic word.

On top, MXNet's ``recordio.pack``/``unpack`` prepend an ``IRHeader`` (struct ``IfQQ``:
``flag``, ``label``, ``id``, ``id2``, 24 bytes). When ``flag > 0`` the scalar ``label`` is
unused and ``flag`` float32 labels follow the header (array labels).

>>> with RecordIOWriter("x.rec", "x.idx") as w:
...     w.write_idx(0, pack(IRHeader(0, 3.0, 0, 0), jpeg_bytes))
>>> header, image = unpack(RecordIOReader("x.rec", "x.idx").read_idx(0))
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
import tempfile
from typing import Iterator, NamedTuple, Sequence, Union

import numpy as np

__all__ = ["MAGIC", "IRHeader", "RecordIOError", "RecordIOReader", "RecordIOWriter", "pack",
           "unpack", "read_index", "image_format", "frame_record", "IR_SIZE", "MIN_RECORD"]

logger = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_LEN_MASK = (1 << 29) - 1
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24
#: Smallest record: the 8-byte frame header of an empty payload. A .rec of S bytes therefore
#: holds at most S // 8 records, which bounds what its .idx may list before anything is built.
MIN_RECORD = _FRAME.size
#: Longest ``key<TAB>offset`` line accepted per record when bounding the .idx's size (MXNet
#: writes ``%d\t%d\n``: at most 41 bytes).
_MAX_IDX_LINE = 64


class RecordIOError(ValueError):
    """A RecordIO file is missing, truncated or malformed; the message names file and record."""


class IRHeader(NamedTuple):
    """MXNet's image record header. ``label`` is a float, or a float32 array when flag > 0."""
    flag: int
    label: Union[float, np.ndarray]
    id: int
    id2: int


def pack(header: IRHeader | Sequence, payload: bytes) -> bytes:
    """Header + payload as MXNet's ``recordio.pack`` writes them.

    A scalar label gives ``flag=0``; a sequence/array label is stored as ``flag=len`` float32
    values after the header (the header's own label field is then 0), whatever flag was given.
    """
    flag, label, rid, rid2 = header
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _IR.pack(0, float(label), int(rid), int(rid2)) + bytes(payload)
    arr = np.asarray(label, dtype="<f4").ravel()
    return _IR.pack(arr.size, 0.0, int(rid), int(rid2)) + arr.tobytes() + bytes(payload)


def unpack(record: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record payload into its ``IRHeader`` and the remaining bytes (the image).

    ``where`` names the record in error messages (e.g. ``"record 17 of train.rec"``).
    """
    if len(record) < IR_SIZE:
        raise RecordIOError(f"{where}: payload of {len(record)} bytes is shorter than the "
                            f"{IR_SIZE}-byte IRHeader (truncated or not an image record)")
    flag, label, rid, rid2 = _IR.unpack_from(record, 0)
    body = memoryview(record)[IR_SIZE:]
    if flag > 0:
        need = 4 * flag
        if len(body) < need:
            raise RecordIOError(f"{where}: header says flag={flag} float32 labels follow, but "
                                f"only {len(body)} bytes remain (truncated or corrupt header)")
        label = np.frombuffer(body[:need], dtype="<f4").copy()
        body = body[need:]
    return IRHeader(flag, label, rid, rid2), bytes(body)


_FORMATS = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"),
            (b"GIF8", "gif"), (b"RIFF", "webp"))


def image_format(data: bytes) -> str | None:
    """File extension for encoded image bytes by their magic bytes (jpg/png/...), or None."""
    for magic, ext in _FORMATS:
        if data[:len(magic)] == magic:
            if ext == "webp" and data[8:12] != b"WEBP":
                continue
            return ext
    return None


def read_index(idx_path: str | os.PathLike, rec_size: int | None = None
               ) -> tuple[list[int], dict[int, int]]:
    """Parse a ``.idx`` file of ``key\\toffset`` lines -> (keys in file order, key->offset).

    With ``rec_size`` (the .rec's size in bytes) the index may list at most
    ``rec_size // MIN_RECORD`` keys, checked on the file's size before reading and on the
    count while reading, so an index that does not belong to its .rec cannot make the reader
    build millions of entries.
    """
    keys: list[int] = []
    offsets: dict[int, int] = {}
    try:
        f = open(idx_path, "r", encoding="ascii")
    except FileNotFoundError:
        raise FileNotFoundError(f"RecordIO index not found: {idx_path} (expected the .idx "
                                "file written beside the .rec)") from None
    max_keys = None if rec_size is None else rec_size // MIN_RECORD
    with f:
        if max_keys is not None:
            idx_size = os.fstat(f.fileno()).st_size
            if idx_size > _MAX_IDX_LINE * (max_keys + 1):
                raise RecordIOError(
                    f"{idx_path}: {idx_size} bytes is too large for the index of a {rec_size}-"
                    f"byte .rec (at most {max_keys} records of >= {MIN_RECORD} bytes, "
                    f"{_MAX_IDX_LINE} bytes of index each): the .idx does not belong to this "
                    ".rec (or the .rec is truncated)")
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                parts = line.split()
            try:
                key, off = int(parts[0]), int(parts[1])
                if len(parts) != 2 or off < 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise RecordIOError(f"{idx_path}:{lineno}: expected 'key<TAB>offset' with "
                                    f"integers, got {line[:80]!r}") from None
            if key in offsets:
                raise RecordIOError(f"{idx_path}:{lineno}: duplicate key {key}")
            if max_keys is not None and len(keys) >= max_keys:
                raise RecordIOError(
                    f"{idx_path}:{lineno}: more than {max_keys} keys, but a {rec_size}-byte "
                    f".rec holds at most {max_keys} records (>= {MIN_RECORD} bytes each): the "
                    ".idx does not belong to this .rec (or the .rec is truncated)")
            keys.append(key)
            offsets[key] = off
    return keys, offsets


class RecordIOReader:
    """Random access to an indexed RecordIO file through a read-only memory map.

    Fork-safe: the map is opened lazily in each process (keyed by pid) and is not pickled, so
    a reader (or a Dataset holding one) can be handed to DataLoader workers, forked or
    spawned. Without ``idx_path`` only sequential :meth:`scan` is available. The index may
    list at most as many keys as the .rec's size allows (:func:`read_index`).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = None if idx_path is None else os.fspath(idx_path)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.keys: list[int] = []
        self._offsets: dict[int, int] = {}
        if self.idx_path is not None:
            self.keys, self._offsets = read_index(self.idx_path,
                                                  os.path.getsize(self.rec_path))
        self._mm: mmap.mmap | None = None
        self._file = None
        self._pid: int | None = None
        self._name = os.path.basename(self.rec_path)

    # -- process-local memory map -------------------------------------------------------
    def _buffer(self) -> mmap.mmap | bytes:
        if self._pid != os.getpid() or self._mm is None:
            self._mm, self._file = None, None  # a parent's map is not ours to close
            f = open(self.rec_path, "rb")
            size = os.fstat(f.fileno()).st_size
            # mmap cannot map an empty file; an empty buffer reads as "past the end" below
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._file = f
            self._pid = os.getpid()
        return self._mm

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = state["_file"] = state["_pid"] = None
        return state

    @property
    def size(self) -> int:
        """Size of the .rec file in bytes."""
        return len(self._buffer())

    def close(self) -> None:
        """Release this process's map (it reopens on the next read)."""
        if self._pid == os.getpid():
            if isinstance(self._mm, mmap.mmap):
                self._mm.close()
            if self._file is not None:
                self._file.close()
        self._mm = self._file = self._pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return len(self.keys)

    # -- reading --------------------------------------------------------------------------
    def offset(self, key: int) -> int:
        """Byte offset of ``key`` in the .rec, from the index."""
        try:
            return self._offsets[key]
        except KeyError:
            raise KeyError(f"record key {key} is not in {self.idx_path}") from None

    def read_idx(self, key: int) -> bytes:
        """Payload of the record with ``key`` (continuation parts joined)."""
        payload, _ = self.read_at(self.offset(key), where=f"record {key}")
        return payload

    def read_at(self, offset: int, where: str | None = None) -> tuple[bytes, int]:
        """Payload of the record starting at byte ``offset`` and the offset after it."""
        buf = self._buffer()
        size = len(buf)
        label = where or f"record at offset {offset}"
        ctx = f"{label} of {self.rec_path}"
        parts: list[bytes] = []
        pos = offset
        while True:
            if pos < 0 or pos >= size:
                if pos == offset:
                    raise RecordIOError(f"{ctx}: offset {pos} is past the end of the file "
                                        f"({size} bytes); the .idx does not match the .rec "
                                        "(truncated copy or index of another file)")
                raise RecordIOError(f"{ctx}: continuation part at offset {pos} is past the end "
                                    f"of the file ({size} bytes): the file is truncated")
            if pos + 8 > size:
                raise RecordIOError(f"{ctx}: only {size - pos} bytes left at offset {pos}, need "
                                    "an 8-byte record header: the file is truncated")
            magic, lrec = _FRAME.unpack_from(buf, pos)
            if magic != MAGIC:
                raise RecordIOError(f"{ctx}: bad magic 0x{magic:08x} at offset {pos} (expected "
                                    f"0x{MAGIC:08x}): not a RecordIO record boundary; the .idx "
                                    "offset is wrong or the file is corrupt")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            start = pos + 8
            if start + length > size:
                raise RecordIOError(f"{ctx}: record of {length} bytes at offset {pos} runs past "
                                    f"the end of the file ({size} bytes): the file is truncated")
            parts.append(buf[start:start + length])
            pos = start + ((length + 3) & ~3)
            if cflag == 0 or cflag == 3:
                break
            if cflag not in (1, 2):
                raise RecordIOError(f"{ctx}: invalid continuation flag {cflag} at offset {pos}")
            parts.append(_MAGIC_BYTES)  # the writer dropped an aligned magic word here
        if len(parts) == 1:
            return parts[0], pos
        return b"".join(parts), pos

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, payload)`` for every record in file order (no index needed)."""
        pos, size = 0, self.size
        n = 0
        while pos < size:
            payload, nxt = self.read_at(pos, where=f"record #{n} (sequential scan)")
            yield pos, payload
            pos, n = nxt, n + 1


def frame_record(payload: bytes) -> list:
    """The bytes of one record as they go into a ``.rec`` (framing, continuation parts at
    aligned magic words, padding), as a list of chunks to write in order. What
    :class:`RecordIOWriter` writes; a resumable writer (``tools/img2rec.py``) appends them
    itself."""
    raw = bytes(payload)
    data = memoryview(raw)
    n = len(raw)
    if n >= (1 << 29):
        raise RecordIOError(f"record of {n} bytes is too large for RecordIO (< 2^29 bytes)")
    out = []
    dptr = 0
    # positions of the magic word at 4-byte aligned offsets inside the payload
    if n >= 4 and _MAGIC_BYTES in raw:
        words = np.frombuffer(raw, dtype="<u4", count=n >> 2)
        for i in (np.flatnonzero(words == MAGIC) * 4).tolist():
            out.append(_FRAME.pack(MAGIC, ((1 if dptr == 0 else 2) << 29) | (i - dptr)))
            out.append(data[dptr:i])
            dptr = i + 4
    out.append(_FRAME.pack(MAGIC, ((3 if dptr else 0) << 29) | (n - dptr)))
    out.append(data[dptr:])
    pad = (-n) & 3
    if pad:
        out.append(b"\0" * pad)
    return out


class RecordIOWriter:
    """Writes an indexed RecordIO file as MXNet's ``MXIndexedRecordIO(..., 'w')`` does.

    Both files are written to temporary names and moved into place (fsync + ``os.replace``)
    on :meth:`close`, so a crash never leaves a half-written ``.rec`` under the final name.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = None if idx_path is None else os.fspath(idx_path)
        d = os.path.dirname(os.path.abspath(self.rec_path))
        os.makedirs(d, exist_ok=True)
        fd, self._tmp_rec = tempfile.mkstemp(prefix=".tmp-", suffix=".rec", dir=d)
        os.chmod(self._tmp_rec, 0o644)  # mkstemp's 0600 would make the dataset private
        self._f = os.fdopen(fd, "wb", buffering=1 << 20)
        self._pos = 0
        self._index: list[tuple[int, int]] = []
        self._keys: set[int] = set()
        self._closed = False

    def write(self, payload: bytes) -> int:
        """Append one record; returns its offset. Splits at aligned magic words as dmlc does."""
        offset = self._pos
        for chunk in frame_record(payload):
            self._f.write(chunk)
            self._pos += len(chunk)
        return offset

    def write_idx(self, key: int, payload: bytes) -> int:
        """Append a record under ``key`` in the index; returns its offset."""
        key = int(key)
        if key in self._keys:
            raise RecordIOError(f"duplicate key {key} written to {self.rec_path}")
        off = self.write(payload)
        self._keys.add(key)
        self._index.append((key, off))
        return off

    def close(self) -> None:
        """Flush, fsync and move both files into place."""
        if self._closed:
            return
        self._closed = True
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.idx_path is not None:
            d = os.path.dirname(os.path.abspath(self.idx_path))
            fd, tmp_idx = tempfile.mkstemp(prefix=".tmp-", suffix=".idx", dir=d)
            os.chmod(tmp_idx, 0o644)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write("".join(f"{k}\t{o}\n" for k, o in self._index))
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._tmp_rec, self.rec_path)
            os.replace(tmp_idx, self.idx_path)
        else:
            os.replace(self._tmp_rec, self.rec_path)

    def abort(self) -> None:
        """Discard what was written (the final names are left untouched)."""
        if not self._closed:
            self._closed = True
            self._f.close()
            os.unlink(self._tmp_rec)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
