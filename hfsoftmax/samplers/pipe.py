"""Messages between the trainer and its index process, in the parameter server's wire format.

A message is the frames of :func:`paramserver.wire.encode`: a UTF-8 JSON header, whose
``"arrays"`` list describes the raw array frames after it (int64 / float32, little-endian,
C order), then those frames. Over the pipe (a socketpair wrapped in a
``multiprocessing.connection.Connection``) each frame is one ``send_bytes``, so the frame
boundaries survive; the receiver reads the header, then as many frames as it announces, and
checks them with :func:`paramserver.wire.decode_arrays`. Nothing is pickled, on either side.

Torch-free: the index process imports it.

>>> send(conn, {"op": "query", "k": 10}, [features])
>>> reply, (ids,) = recv(conn)
"""
from __future__ import annotations

import traceback
from typing import Sequence

import numpy as np

from paramserver import wire

__all__ = ["MAX_ARRAYS", "ERROR_TYPES", "send", "recv", "error_reply", "remote_error"]

#: the most array frames one message may announce (a garbled header must not make the
#: receiver wait for frames that never come)
MAX_ARRAYS = 8
#: exception types the trainer re-raises as themselves (others: the caller's ``fallback``)
ERROR_TYPES = {"ValueError": ValueError, "TypeError": TypeError, "ImportError": ImportError,
               "ModuleNotFoundError": ImportError, "FloatingPointError": FloatingPointError,
               "KeyError": KeyError, "IndexError": IndexError, "TimeoutError": TimeoutError}


def send(conn, header: dict, arrays: Sequence[np.ndarray] = ()) -> None:
    """Send one message: the header frame, then one frame per array (not copied)."""
    for frame in wire.encode(header, arrays):
        conn.send_bytes(frame)


def recv(conn) -> tuple[dict, list[np.ndarray]]:
    """Receive one message: ``(header, arrays)``, the arrays read-only views of the frames.

    Raises :class:`paramserver.wire.ProtocolError` on a malformed message, EOFError or
    OSError when the other end is gone.
    """
    header = wire.decode_header(conn.recv_bytes())
    specs = header.get("arrays", [])
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise wire.ProtocolError(f"header 'arrays' must be a list of at most {MAX_ARRAYS} "
                                 f"array descriptors, got {str(specs)[:80]}")
    frames = [conn.recv_bytes() for _ in specs]
    return header, wire.decode_arrays(header, frames)


def error_reply(exc: BaseException) -> dict:
    """The header of an error reply: the exception's type, message and (tail of the)
    traceback."""
    return {"ok": False, "type": type(exc).__name__, "error": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc,
                                                            exc.__traceback__))[-4000:]}


def remote_error(reply: dict, context: str, fallback: type = RuntimeError) -> BaseException:
    """The exception an error reply stands for, raised on this side: its own type where it is
    one of :data:`ERROR_TYPES`, else ``fallback``; the remote traceback rides along."""
    typ = ERROR_TYPES.get(reply.get("type"), fallback)
    exc = typ(f"{context}: {reply.get('type')}: {reply.get('error')}")
    exc.remote_traceback = reply.get("traceback")  # type: ignore[attr-defined]
    return exc
