"""hfsoftmax.fileio.atomic_write: complete new file or the old one, never a partial file."""
import os

import pytest

from hfsoftmax.fileio import atomic_write


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    with atomic_write(p, "w") as f:
        f.write("one\n")
    assert p.read_text() == "one\n" and oct(p.stat().st_mode & 0o777) == "0o644"
    with atomic_write(p) as f:
        f.write(b"two\n")
    assert p.read_bytes() == b"two\n"
    assert sorted(os.listdir(p.parent)) == ["a.txt"]


def test_a_crash_mid_write_keeps_the_previous_file(tmp_path):
    p = tmp_path / "ckpt.pth"
    p.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(p) as f:
            f.write(b"half of the new con")
            raise RuntimeError("crash")
    assert p.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_bad_mode_is_named(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_write_text_is_utf8_and_atomic(tmp_path):
    from hfsoftmax.fileio import write_text

    p = tmp_path / "r.json"
    write_text(p, "ok \u00e9\n")
    assert p.read_bytes() == "ok \u00e9\n".encode("utf-8")
    with pytest.raises(TypeError):
        write_text(p, b"bytes are not text")
    assert p.read_text(encoding="utf-8") == "ok \u00e9\n" and os.listdir(tmp_path) == ["r.json"]


def test_write_json_round_trips_and_a_bad_object_leaves_the_file(tmp_path):
    import json

    from hfsoftmax.fileio import write_json

    p = tmp_path / "r.json"
    text = write_json(p, {"b": 1, "a": [0.5]}, indent=2, sort_keys=True)
    assert p.read_text() == text + "\n" and text.index('"a"') < text.index('"b"')
    assert json.loads(p.read_text()) == {"a": [0.5], "b": 1}
    with pytest.raises(TypeError, match="set"):
        write_json(p, {"a": {1, 2}})  # not JSON: refused before the file is touched
    assert json.loads(p.read_text()) == {"a": [0.5], "b": 1} and os.listdir(tmp_path) == ["r.json"]
