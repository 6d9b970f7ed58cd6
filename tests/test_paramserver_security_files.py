"""Issue 25, server part, must show 3 and 4: what a restore may change, and bad snapshot
files, against real server processes (the restore op, and ``--restore`` at start-up)."""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paramserver import ParamClient, ParamServerError, SGDConfig, Table
from paramserver.snapshot import SnapshotError, read_snapshot, write_snapshot
from tests.ps_utils import SERVER_SCRIPT, running_server, server_log

pytestmark = pytest.mark.timeout(180)

ROWS, DIM = 6, 3


def _state(ps: ParamClient, name: str) -> tuple:
    """Everything about a table: checksum (weights, momentum, settings), step, values."""
    shard = ps.table_info(name, checksum=True)["shards"][0]
    return (shard["checksum"], shard["step"], ps.read_all(name).tobytes(),
            ps.read_all(name, field="momentum").tobytes())


def _train(ps: ParamClient, name: str, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ps.push(name, rng.integers(0, 40, 8), rng.standard_normal((8, 4)).astype(np.float32))


# ------------------------------------------------- must show 3: restore isolation
def test_restore_changes_only_the_tables_it_names(tmp_path):
    """Two runs share a server (tables A and B). A resumes: B is bit-identical before and
    after. B resumes: A is not rolled back. A restore of a file holding both tables, asked
    for one, leaves the other alone."""
    with running_server("--snapshot-dir", str(tmp_path)) as (proc, addr), \
            ParamClient(addr, timeout_s=10) as ps:
        for name, seed in (("A", 1), ("B", 2)):
            ps.create_table(name, 40, 4, seed=seed)
            ps.set_optimizer(name, lr=0.1, momentum=0.9)
            _train(ps, name, 2, seed)
        ps.snapshot("runA/rows", tables=["A"])
        ps.snapshot("runB/rows", tables=["B"])
        ps.snapshot("both")
        assert list(read_snapshot(tmp_path / "runA" / "rows")[0]) == ["A"]
        a_saved = _state(ps, "A")
        _train(ps, "A", 3, 10)
        _train(ps, "B", 1, 11)
        b_now = _state(ps, "B")
        assert _state(ps, "A") != a_saved

        ps.restore("runA/rows")  # run A resumes
        assert _state(ps, "A") == a_saved
        assert _state(ps, "B") == b_now  # bit-identical: not deleted, not rolled back
        _train(ps, "A", 2, 12)
        a_now = _state(ps, "A")
        ps.restore("runB/rows", tables=["B"])  # run B resumes
        assert _state(ps, "A") == a_now
        assert _state(ps, "B")[1] == 2

        _train(ps, "B", 1, 13)
        b_now = _state(ps, "B")
        reply = ps.restore("both", tables=["A"])[0]
        assert reply["tables"] == {"A": 2}
        assert _state(ps, "A") == a_saved and _state(ps, "B") == b_now
        with pytest.raises(ParamServerError, match=r"has no table\(s\) \['B'\]"):
            ps.restore("runA/rows", tables=["B"])
        with pytest.raises(ParamServerError, match="no table"):
            ps.snapshot("x", tables=["A", "missing"])
        with pytest.raises(ParamServerError, match="table name"):
            ps.snapshot("x", tables=["w\n"])
        assert _state(ps, "A") == a_saved and _state(ps, "B") == b_now
        assert ps.ping()[0]["tables"] == {"A": 2, "B": 3}
    assert "Traceback" not in server_log(proc)


# --------------------------------------------------- must show 4: bad snapshot files
def _good_snapshot(path: Path) -> bytes:
    t = Table("w", ROWS, DIM, init="normal", std=0.5, seed=1,
              optim=SGDConfig(lr=0.1, momentum=0.9))
    t.momentum[:] = 0.25
    t.updates = 4
    write_snapshot(path, {"w": t})
    return path.read_bytes()


def _edit(raw: bytes, header_fn=None, tables_fn=None, data_fn=None) -> bytes:
    """A copy of the snapshot ``raw`` with its header, table list or data edited."""
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    data = bytearray(raw[8 + hlen:])
    if tables_fn:
        tables = json.loads(header["__metadata__"]["tables"])
        tables_fn(tables)
        header["__metadata__"]["tables"] = json.dumps(tables)  # floats: 1e+300, Infinity
    if header_fn:
        header_fn(header)
    if data_fn:
        data_fn(header, data)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + bytes(data)


def _poke(key: str, index: int, value: float):
    def fn(header, data):
        a = header[key]["data_offsets"][0] + 4 * index
        data[a:a + 4] = np.float32(value).tobytes()
    return fn


def _set_step(value):
    return lambda tables: tables["w"].__setitem__("step", value)


def _shift_weight(header):
    a, b = header["w/weight"]["data_offsets"]
    header["w/weight"]["data_offsets"] = [a - 8, b - 8]


def _overlap(header):
    header["w/momentum"]["data_offsets"] = list(header["w/weight"]["data_offsets"])


def _rename(header):
    tables = json.loads(header["__metadata__"].pop("tables"))
    header["__metadata__"]["tables"] = json.dumps({"w\n": tables["w"]})
    for field in ("weight", "momentum"):
        header[f"w\n/{field}"] = header.pop(f"w/{field}")


BAD = {  # kind -> (edit, what the error says)
    "nan weights": (dict(data_fn=_poke("w/weight", 7, np.nan)), "w/weight of row 2 is not "
                                                                 "finite"),
    "inf momentum": (dict(data_fn=_poke("w/momentum", 17, np.inf)), "w/momentum of row 5 is "
                                                                    "not finite"),
    "step -5": (dict(tables_fn=_set_step(-5)), r"step must be an integer in \[0, "
                                               r"9007199254740991\], got -5"),
    "step 1e300": (dict(tables_fn=_set_step(1e300)), r"step must be an integer .*got 1e\+300"),
    "step Infinity": (dict(tables_fn=_set_step(float("inf"))), "holds Infinity"),
    "negative data offset": (dict(header_fn=_shift_weight), r"w/weight data offset begin must "
                                                            r"be an integer in \[0, "),
    "overlapping offsets": (dict(header_fn=_overlap), "tensors w/momentum and w/weight "
                                                      "overlap"),
    "invalid table name": (dict(header_fn=_rename), r"table name 'w\\n' must be"),
}


def test_each_kind_of_bad_snapshot_is_refused_by_restore_and_changes_nothing(tmp_path):
    good = _good_snapshot(tmp_path / "good.st")
    for kind, (edit, _) in BAD.items():
        (tmp_path / kind.replace(" ", "_")).write_bytes(_edit(good, **edit))
    with running_server("--snapshot-dir", str(tmp_path)) as (proc, addr), \
            ParamClient(addr, timeout_s=10) as ps:
        ps.create_table("w", ROWS, DIM, seed=3)
        ps.create_table("other", 40, 4, seed=4)
        ps.set_optimizer("w", lr=0.5)
        ps.push("w", [1, 2], np.ones((2, DIM)))
        before = {n: _state(ps, n) for n in ("w", "other")}
        for kind, (_, why) in BAD.items():
            for tables in (None, ["w"]):
                with pytest.raises(ParamServerError, match=why):
                    ps.restore(kind.replace(" ", "_"), tables=tables)
            with pytest.raises(SnapshotError, match=why):  # the in-process reader too
                read_snapshot(tmp_path / kind.replace(" ", "_"))
            assert {n: _state(ps, n) for n in ("w", "other")} == before, kind
        ps.restore("good.st")  # the control: a good file restores
        assert ps.table_info("w")["step"] == 4 and _state(ps, "other") == before["other"]
    log = server_log(proc)
    assert "Traceback" not in log and "internal" not in log


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_kind_of_bad_snapshot_at_start_exits_2_with_one_line(kind, tmp_path):
    edit, why = BAD[kind]
    path = tmp_path / "bad.st"
    path.write_bytes(_edit(_good_snapshot(tmp_path / "good.st"), **edit))
    for restore in (str(path), path.name):  # absolute, or relative to --snapshot-dir
        out = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--bind", "tcp://127.0.0.1:*",
                              "--snapshot-dir", str(tmp_path), "--restore", restore],
                             capture_output=True, text=True, timeout=60)
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1, (out.returncode, lines)
        assert "cannot start: --restore" in lines[0] and "nothing was restored" in lines[0]
        assert re.search(why, lines[0]), lines[0]
    with running_server("--snapshot-dir", str(tmp_path), "--restore", "good.st") as (_, addr), \
            ParamClient(addr, timeout_s=10) as ps:
        assert ps.table_info("w")["step"] == 4
