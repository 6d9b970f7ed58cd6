"""Verification .bin loading: the Python-2 fixture, refusal of code-running pickles and of
pickles that inflate when loaded (memo references, object spam)."""
import pickle

import numpy as np
import pytest

from hfsoftmax.data.transforms import normalize_uint8
from hfsoftmax.data.verification import (UnsafePickleError, check_pickle_size, decode_pairs,
                                         dump_bin, load_bin, loads_bin)
from tests.bin_utils import memo_bomb


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


# -- size bombs: refused from the opcodes, before anything is built ---------------------------

def test_memo_amplified_bin_is_refused_quickly_without_allocating(tmp_path):
    import time
    import tracemalloc

    data = memo_bomb()
    # control: the file really is a valid (bins, issame) that decodes to 3000 x 1 MiB
    bins, issame = pickle.loads(data, encoding="bytes")
    assert len(bins) == 3000 and sum(map(len, bins)) == 3000 << 20 and len(issame) == 1500
    del bins, issame
    path = tmp_path / "bomb.bin"
    path.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError) as info:
            load_bin(path)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert str(path) in msg and "refused" in msg and "memo reference" in msg
    assert f"{len(data)}-byte pickle" in msg and "over the bound of" in msg
    assert "\n" not in msg
    assert seconds < 2.0
    assert peak < 16 * len(data)  # a few copies of the 1 MiB file, not 3 GB
    # the same bytes as a 102 KiB image referenced 30,000 times (the reviewer's eval case)
    with pytest.raises(ValueError, match="refused"):
        loads_bin(memo_bomb(102 << 10, 30000))


def test_size_bound_admits_genuine_files_and_few_repeats(shared_fixtures):
    raw = (shared_fixtures / "verification-py2.bin").read_bytes()
    bins, issame = load_bin(shared_fixtures / "verification-py2.bin")
    assert check_pickle_size(raw) < 1.1 * len(raw)
    # every protocol Python 3 writes, including protocol 2's _codecs.encode form of bytes
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        assert loads_bin(pickle.dumps((bins, issame), protocol=proto)) == (bins, issame)
    # a writer that pickled the same image object twice (a memo reference) is still fine
    twice = [bins[0]] * 2 + bins[2:]
    assert loads_bin(pickle.dumps((twice, issame), protocol=2)) == (twice, issame)


def test_object_spam_and_too_many_pairs_are_refused(monkeypatch):
    # 3 MB of one-byte opcodes each building a new empty list: ~64 bytes per file byte
    spam = b"\x80\x02](" + b"]" * (3 << 20) + b"e]\x86."
    with pytest.raises(ValueError, match="refused: loading this"):
        loads_bin(spam)
    # a broken opcode stream is reported as unreadable, not as a crash
    with pytest.raises(ValueError, match="not a readable.*never stored"):
        loads_bin(b"\x80\x02h\x05.")
    # many tiny images: 2-byte empty strings cost an object each, refused by the size bound
    n = 1 << 20
    tiny = b"\x80\x02](" + b"C\x00" * (2 * n) + b"e](" + b"\x89" * n + b"e\x86."
    with pytest.raises(ValueError, match="refused: loading this"):
        loads_bin(tiny)
    # the pair count has its own cap (lowered here: a real over-cap file is 40 MB)
    from hfsoftmax.data import verification

    monkeypatch.setattr(verification, "MAX_PAIRS", 2)
    assert loads_bin(pickle.dumps(([b"a"] * 4, [True] * 2))) == ([b"a"] * 4, [True] * 2)
    with pytest.raises(ValueError, match="3 pairs, more than the 2 a verification .bin"):
        loads_bin(pickle.dumps(([b"a"] * 6, [True] * 3)))


def test_codecs_encode_global_cannot_be_altered_by_build():
    # BUILD with a slot state runs setattr on what find_class returned: each file gets its own
    # function, so the loader's own encoder keeps its defaults for the next file
    from hfsoftmax.data import verification

    evil = (b"\x80\x02c_codecs\nencode\n"
            b"N}X\x0c\x00\x00\x00__defaults__X\x05\x00\x00\x00rot13\x85s\x86b0"
            b"]]\x86.")
    assert loads_bin(evil) == ([], [])  # the BUILD itself succeeds, on a throwaway function
    assert verification._latin1_encode.__defaults__ == ("latin1",)
    assert loads_bin(pickle.dumps(([b"\xffa", b"b"], [True]), protocol=2)) == \
        ([b"\xffa", b"b"], [True])


def test_size_model_covers_every_pickle_opcode():
    # an opcode the model does not know is refused as unreadable; make sure that is none today
    import pickletools

    from hfsoftmax.data import verification as v

    known = (v._NEW_LEAF | v._NEW_ATOM | v._SINGLETON | v._NOOP | v._GET | v._PUT
             | set(v._INTO) | set(v._CONTAINER) | set(v._CALL)
             | {"DUP", "MEMOIZE", "MARK", "POP", "POP_MARK"})
    assert {op.name for op in pickletools.opcodes} <= known

