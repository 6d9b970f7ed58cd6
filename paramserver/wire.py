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
           "decode_arrays", "array_spec"]

PROTOCOL_VERSION = 1
# The only dtypes on the wire; always little-endian.
DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}
# Bound on any shape entry / element count we are willing to believe from a header.
MAX_ELEMENTS = 1 << 40


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


def decode_header(frame: Any) -> dict:
    """Parse a header frame (bytes or zmq.Frame) into a dict, or raise ``ProtocolError``."""
    raw = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    try:
        header = json.loads(raw.decode("utf-8"),
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"header frame is not UTF-8 JSON: {exc}") from None
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
