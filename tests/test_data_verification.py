"""Verification .bin loading: the Python-2 fixture, and refusal of code-running pickles."""
import pickle

import numpy as np
import pytest

from hfsoftmax.data.transforms import normalize_uint8
from hfsoftmax.data.verification import (UnsafePickleError, decode_pairs, dump_bin, load_bin,
                                         loads_bin)


def test_py2_fixture_loads(shared_fixtures):
    path = shared_fixtures / "verification-py2.bin"
    # plain pickle cannot even read it (Python 2 str): the reason load_bin exists
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())
    bins, issame = load_bin(path)
    assert len(bins) == 40 and len(issame) == 20
    assert all(isinstance(b, bytes) for b in bins)
    assert all(isinstance(s, bool) for s in issame)
    assert issame[0] is True and issame == [i % 2 == 0 for i in range(20)]
    imgs = decode_pairs(bins)
    assert imgs.shape == (40, 112, 112, 3) and imgs.dtype == np.uint8
    x = normalize_uint8(imgs[:2])
    assert x.shape == (2, 3, 112, 112) and float(x.min()) >= -1 and float(x.max()) <= 1


def _malicious(cmd: str, proto_global=b"cos\nsystem\n") -> bytes:
    # GLOBAL os.system, MARK, the command, TUPLE, REDUCE: os.system(cmd) on plain pickle.load
    c = cmd.encode()
    return (b"\x80\x02" + proto_global + b"(X" + len(c).to_bytes(4, "little") + c
            + b"tR.")


def test_malicious_reduce_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(_malicious(f"touch {marker}"))
    with pytest.raises(UnsafePickleError, match=r"refused to load global os\.system"):
        load_bin(evil)
    assert not marker.exists()
    # control: the same bytes DO run the command under plain pickle (so the test is real)
    ctrl = tmp_path / "ctrl"
    pickle.loads(_malicious(f"touch {ctrl}"))
    assert ctrl.exists()


def test_other_globals_refused(tmp_path):
    # a numpy-array .bin (some re-saved files) is refused by name, not executed
    data = pickle.dumps(([np.zeros(2)], [True]), protocol=2)
    with pytest.raises(UnsafePickleError, match=r"numpy\.[\w.]+"):
        loads_bin(data)
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        loads_bin(b"\x80\x02cbuiltins\neval\n(X\x03\x00\x00\x001+1tR.")
    # _codecs.encode is only admitted as the latin-1 str->bytes Python 3 uses for bytes
    with pytest.raises(UnsafePickleError, match="_codecs.encode"):
        loads_bin(b"\x80\x02c_codecs\nencode\n(X\x01\x00\x00\x00aX\x05\x00\x00\x00rot13tR.")


def test_dump_bin_roundtrip_and_py2_layout(tmp_path, shared_fixtures):
    bins, issame = load_bin(shared_fixtures / "verification-py2.bin")
    out = tmp_path / "copy.bin"
    dump_bin(out, bins, issame)
    raw = out.read_bytes()
    assert raw[:2] == b"\x80\x02" and b"c" not in raw[:3]  # protocol 2, no globals
    assert load_bin(out) == (bins, issame)
    # what InsightFace's evaluation code does in Python 3
    assert pickle.loads(raw, encoding="bytes") == (bins, issame)
    # a Python 3 writer's protocol-2 and protocol-4 pickles load too
    assert loads_bin(pickle.dumps((bins, issame), protocol=2)) == (bins, issame)
    assert loads_bin(pickle.dumps((bins, issame), protocol=4)) == (bins, issame)
    big = [bytes(300), bytes(3)]  # BINSTRING and SHORT_BINSTRING
    dump_bin(out, big, [False])
    assert load_bin(out) == (big, [False])


def test_shape_errors(tmp_path):
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        loads_bin(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(ValueError, match=r"issame_list\[0\]"):
        loads_bin(pickle.dumps(([b"a", b"b"], ["yes"])))
    with pytest.raises(ValueError, match="not a readable"):
        loads_bin(b"\x80\x02]q")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_bin(tmp_path / "nope.bin")
