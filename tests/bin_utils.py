"""Hostile verification .bin files, built opcode by opcode, for the loader's and the CLI's tests."""


def memo_bomb(image_size: int = 1 << 20, refs: int = 3000) -> bytes:
    """A protocol-2 .bin whose bins are ``refs`` memo references (BINGET) to one byte string
    of ``image_size`` bytes stored once: ``(bins, issame)`` with ``refs // 2`` pairs."""
    big = b"\xff\xd8\xff\xe0" + bytes(image_size - 4)
    out = b"\x80\x02"                                  # PROTO 2
    out += b"]"                                        # EMPTY_LIST: bins
    out += b"T" + len(big).to_bytes(4, "little") + big  # BINSTRING: the image, once
    out += b"q\x00" + b"0"                             # BINPUT 0, POP
    out += b"(" + b"h\x00" * refs + b"e"               # MARK, refs x BINGET 0, APPENDS
    out += b"](" + b"\x88" * (refs // 2) + b"e"        # issame: refs/2 x NEWTRUE
    return out + b"\x86."                              # TUPLE2, STOP
