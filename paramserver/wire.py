"""Wire format shared by the server and the client: a JSON header frame, then raw arrays.

Every message (request or reply) is ZeroMQ multipart::

    [b"" (empty delimiter)] [header: UTF-8 JSON object] [array 0 bytes] [array 1 bytes] ...

The header's ``"arrays"`` list describes the frames after it, one entry
``{"dtype": "int64" | "float32", "shape": [...]}`` per frame, little-endian, C order.
No pickle anywhere. See ``paramserver/PROTOCOL.md`` for the full protocol.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

__all__ = ["PROTOCOL_VERSION", "DTYPES", "ProtocolError", "encode", "decode_header",
           "decode_arrays", "array_spec", "json_depth", "MAX_JSON_DEPTH"]

PROTOCOL_VERSION = 1
# The only dtypes on the wire; always little-endian.
DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
# Bound on any shape entry / element count we are willing to believe from a header.
MAX_ELEMENTS = 1 << 40
# Deepest JSON nesting a header may have: requests need 4 ({"arrays": [{"shape": [..]}]}),
# replies 4 ({"info": {"pending": {"workers": [..]}}}). Checked before parsing, so a header
# of nested lists costs neither a deep recursion nor an object per bracket.
MAX_JSON_DEPTH = 8
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENS, _CLOSES = (ord("["), ord("{")), (ord("]"), ord("}"))


class ProtocolError(ValueError):
    """A malformed message: bad JSON, bad array descriptors, frames not matching them."""


def array_spec(arr: np.ndarray) -> dict:
    """The header descriptor of one array frame."""
    for name, dt in DTYPES.items():
        if arr.dtype == dt:
            return {"dtype": name, "shape": list(arr.shape)}
    raise ProtocolError(f"dtype {arr.dtype} cannot go on the wire; valid: {', '.join(DTYPES)}")


def encode(header: dict, arrays: Sequence[np.ndarray] = ()) -> list:
    """Frames ``[header_json, *arrays]`` (without the empty delimiter); arrays become
    little-endian C-contiguous buffers that pyzmq can send without a copy."""
    bufs = []
    specs = []
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.byteorder == ">" or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        specs.append(array_spec(a))
        bufs.append(a)
    if arrays or "arrays" in header:
        header = {**header, "arrays": specs}
    return [json.dumps(header, separators=(",", ":"), allow_nan=False).encode()] + bufs


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in the JSON text ``raw``, brackets inside strings
    not counted; computed with numpy in a few passes over the bytes, without parsing.

    A quote preceded by an odd number of backslashes is escaped (inside a string); outside
    strings a backslash is not valid JSON, which the parser refuses later anyway."""
    b = np.frombuffer(raw, dtype=np.uint8)
    if b.size == 0:
        return 0
    pos = np.arange(b.size)
    # Length of the run of backslashes right before each byte: i - 1 - (last non-backslash).
    last_other = np.maximum.accumulate(np.where(b != _BACKSLASH, pos, -1))
    run = np.empty(b.size, dtype=np.int64)
    run[0] = 0
    run[1:] = pos[:-1] - last_other[:-1]
    quote = (b == _QUOTE) & (run % 2 == 0)
    in_string = (np.cumsum(quote) - quote) % 2 == 1   # after an odd number of real quotes
    step = (np.isin(b, _OPENS).astype(np.int64) - np.isin(b, _CLOSES)) * ~in_string
    return int(max(0, np.cumsum(step).max()))


def decode_header(frame: Any, max_bytes: int | None = None,
                  max_depth: int = MAX_JSON_DEPTH) -> dict:
    """Parse a header frame (bytes or zmq.Frame) into a dict, or raise ``ProtocolError``.

    Its size (``max_bytes``, when given) and nesting depth are checked before parsing, so a
    hostile header costs at most its own bytes: a parsed JSON list of empty lists takes ~20x
    the memory of its text."""
    size = len(frame)  # checked before the bytes are copied out of a zmq.Frame
    if max_bytes is not None and size > max_bytes:
        raise ProtocolError(f"header frame of {size} bytes exceeds the limit of "
                            f"{max_bytes} bytes (--max-header-bytes); send row ids and "
                            "values as array frames, not in the header")
    raw = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    # Fewer brackets than the limit cannot nest past it: the usual header skips the scan.
    opens = raw.count(b"[") + raw.count(b"{")
    depth = json_depth(raw) if opens > max_depth else opens
    if depth > max_depth:
        raise ProtocolError(f"header nests {depth} levels of JSON lists/objects; at most "
                            f"{max_depth} are accepted")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError too
        raise ProtocolError(f"header frame is not UTF-8 JSON: {_short(str(exc), 200)}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def _reject_constant(name: str):
    raise ProtocolError(f"header contains {name}, which is not valid JSON")


def decode_arrays(header: dict, frames: Sequence[Any]) -> list[np.ndarray]:
    """Read-only numpy views of the array frames, checked against ``header["arrays"]``:
    frame count, dtype names, shapes (non-negative ints) and byte sizes."""
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise ProtocolError(f"header 'arrays' must be a list, got {type(specs).__name__}")
    if len(specs) != len(frames):
        raise ProtocolError(f"header describes {len(specs)} array frame(s) but the message "
                            f"has {len(frames)}")
    out = []
    for i, (spec, frame) in enumerate(zip(specs, frames)):
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
            raise ProtocolError(f"arrays[{i}] must be an object with exactly 'dtype' and "
                                f"'shape', got {_short(spec)}")
        dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        if dtype is None:
            raise ProtocolError(f"arrays[{i}] dtype {_short(spec['dtype'])} not supported; "
                                f"valid: {', '.join(DTYPES)}")
        shape = spec["shape"]
        if (not isinstance(shape, list) or len(shape) > 2
                or not all(type(s) is int and 0 <= s <= MAX_ELEMENTS for s in shape)):
            raise ProtocolError(f"arrays[{i}] shape must be a list of at most 2 non-negative "
                                f"integers, got {_short(shape)}")
        count = int(np.prod(shape, dtype=object)) if shape else 1
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        if count > MAX_ELEMENTS or count * dtype.itemsize != buf.nbytes:
            raise ProtocolError(f"arrays[{i}] {spec['dtype']} {shape} needs "
                                f"{count * dtype.itemsize} bytes but its frame has "
                                f"{buf.nbytes}")
        out.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
