"""Must show 4: 10,000 malformed messages; the server answers each with an error, stays up,
and the table's checksum does not change."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from paramserver import ParamClient
from tests.ps_utils import running_server

pytestmark = pytest.mark.timeout(180)

N, D = 50, 4


def _h(**kw) -> bytes:
    return json.dumps(kw).encode()


def _arr(a: np.ndarray) -> dict:
    return {"dtype": {np.dtype("<i8"): "int64", np.dtype("<f4"): "float32"}.get(a.dtype, "float64"),
            "shape": list(a.shape)}


def malformed(rng: np.random.Generator) -> tuple[str, list[bytes]]:
    """One malformed request (frames after the ROUTER identity) and its kind."""
    rows = rng.integers(0, N, size=int(rng.integers(1, 6))).astype("<i8")
    grads = rng.standard_normal((rows.size, D)).astype("<f4")
    kind = int(rng.integers(0, 28))

    def pick(options: list):
        return options[int(rng.integers(0, len(options)))]
    base_push = {"op": "push", "table": "w", "worker": 0, "step": 1}

    def msg(header: dict | bytes, *frames: bytes) -> list[bytes]:
        return [b"", header if isinstance(header, bytes) else json.dumps(header).encode(),
                *frames]

    def push(header=None, r=rows, g=grads, specs=None):
        header = dict(base_push if header is None else header)
        header["arrays"] = specs if specs is not None else [_arr(r), _arr(g)]
        return msg(header, r.tobytes(), g.tobytes())

    if kind == 0:  # random bytes, random frame count, maybe no delimiter
        frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 5)))]
        if rng.random() < 0.5:
            frames.insert(0, b"")
        return "random bytes", frames
    if kind == 1:
        return "header not JSON", msg(rng.bytes(int(rng.integers(1, 40))) + b"\xff")
    if kind == 2:
        return "header not an object", msg(pick([b"[1,2]", b"3", b'"pull"', b"null"]))
    if kind == 3:
        return "NaN in header", msg(b'{"op": "set_lr", "table": "w", "lr": NaN}')
    if kind == 4:
        return "unknown op", msg({"op": pick(["drop", "PULL", "exec", "", "eval"]),
                                  "table": "w"})
    if kind == 5:
        return "op not a string", msg({"op": int(rng.integers(0, 9)), "table": "w"})
    if kind == 6:
        return "pull rows float32", msg({"op": "pull", "table": "w",
                                         "arrays": [_arr(grads[:, 0].copy())]},
                                        grads[:, 0].tobytes())
    if kind == 7:
        bad = rows.copy()
        bad[int(rng.integers(0, bad.size))] = rng.choice([-1, N, N + 7, -(2 ** 40)])
        return "pull row out of range", msg({"op": "pull", "table": "w", "arrays": [_arr(bad)]},
                                            bad.tobytes())
    if kind == 8:
        return "pull frame size mismatch", msg({"op": "pull", "table": "w",
                                                "arrays": [{"dtype": "int64",
                                                            "shape": [rows.size + 1]}]},
                                               rows.tobytes())
    if kind == 9:
        return "pull missing frame", msg({"op": "pull", "table": "w", "arrays": [_arr(rows)]})
    if kind == 10:
        return "pull extra frame", msg({"op": "pull", "table": "w",
                                        "arrays": [_arr(rows), _arr(rows)]},
                                       rows.tobytes(), rows.tobytes())
    if kind == 11:
        g = grads.copy()
        g.flat[int(rng.integers(0, g.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return "push non-finite grads", push(g=g)
    if kind == 12:
        g = rng.standard_normal((rows.size, D + 1)).astype("<f4")
        return "push wrong dim", push(g=g)
    if kind == 13:
        g = rng.standard_normal((rows.size + 1, D)).astype("<f4")
        return "push rows/grads count mismatch", push(g=g)
    if kind == 14:
        g = grads.astype("<f8")
        return "push float64 grads", push(g=g)
    if kind == 15:
        bad = rows.copy()
        bad[0] = N
        return "push row out of range", push(r=bad)
    if kind == 16:
        h = dict(base_push)
        h.pop(pick(["worker", "step", "table"]))
        return "push missing field", push(header=h)
    if kind == 17:
        h = dict(base_push, step=pick([0, 2, 99, -1]))
        return "push bad step", push(header=h)
    if kind == 18:
        h = dict(base_push, worker=pick(["0", True, -3, 1.5, None]))
        return "push bad worker", push(header=h)
    if kind == 19:
        return "push one frame", msg(dict(base_push, arrays=[_arr(rows)]), rows.tobytes())
    if kind == 20:
        specs = pick([0, 1, 2, 3])
        spec = [{"dtype": "int64", "shape": [-1]}, {"dtype": "int64", "shape": [2 ** 62]},
                {"dtype": "int64", "shape": [1.5]}, "not a spec"][specs]
        return "bad array spec", msg({"op": "pull", "table": "w", "arrays": [spec]},
                                     rows.tobytes())
    if kind == 21:
        v = grads.copy()
        v[0, 0] = np.nan
        return "set_rows NaN", msg({"op": "set_rows", "table": "w",
                                    "arrays": [_arr(rows), _arr(v)]}, rows.tobytes(), v.tobytes())
    if kind == 22:
        return "set_optimizer bad", msg(pick([
            {"op": "set_optimizer", "table": "w", "lr": -1.0},
            {"op": "set_optimizer", "table": "w", "lr": 0.1, "nesterov": True},
            {"op": "set_optimizer", "table": "w", "lr": "0.1"},
            {"op": "set_optimizer", "table": "w", "lr": 0.1, "momentum": -0.5},
            {"op": "set_optimizer", "table": "w", "lr": 0.1, "nesterov": 1, "momentum": 0.9},
            {"op": "set_lr", "table": "w", "lr": -2}, {"op": "set_lr", "table": "w"},
            {"op": "set_lr", "table": "w", "lr": "inf"}]))
    if kind == 23:
        return "create_table conflicting", msg(pick([
            {"op": "create_table", "table": "w", "num_rows": N, "dim": D + 1},
            {"op": "create_table", "table": "w", "num_rows": N + 1, "dim": D},
            {"op": "create_table", "table": "w/../x", "num_rows": 5, "dim": 2},
            {"op": "create_table", "table": "x", "num_rows": 5, "dim": 0},
            {"op": "create_table", "table": "x", "num_rows": 0, "dim": 2},
            {"op": "create_table", "table": "x", "num_rows": 5, "dim": 2, "row_start": 4,
             "row_stop": 2},
            {"op": "create_table", "table": "x", "num_rows": 5, "dim": 2, "init": "ones"}]))
    if kind == 24:
        return "read bad range", msg(pick([
            {"op": "read", "table": "w", "start": 5, "stop": 2},
            {"op": "read", "table": "w", "start": 0, "stop": N + 1},
            {"op": "read", "table": "w", "start": -1, "stop": 3},
            {"op": "read", "table": "w", "field": "grad"}]))
    if kind == 25:
        return "unknown header field", msg({"op": "pull", "table": "w", "rows": [1, 2],
                                            "arrays": [_arr(rows)]}, rows.tobytes())
    if kind == 26:
        return "unknown table", msg({"op": pick(["pull", "table_info", "set_lr"]),
                                     "table": "nope", "lr": 0.1})
    return "restore missing file or bad check", msg(pick([
        {"op": "restore", "path": "/nonexistent/snap"},
        {"op": "restore", "path": "/nonexistent/snap", "check": True},
        {"op": "restore", "path": "/nonexistent/snap", "check": "yes"}]))


def test_ten_thousand_malformed_messages():
    with running_server("--log-level", "WARNING") as (proc, addr):
        with ParamClient(addr, timeout_s=10) as ps:
            ps.create_table("w", N, D, seed=5)
            ps.set_optimizer("w", lr=0.1, momentum=0.9)
            before = ps.table_info("w", checksum=True)["shards"][0]["checksum"]

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvtimeo = 10_000
        sock.connect(addr)
        rng = np.random.default_rng(1234)
        kinds: dict[str, int] = {}
        sent = 0
        try:
            while sent < 10_000:
                batch = [malformed(rng) for _ in range(min(250, 10_000 - sent))]
                for _, frames in batch:
                    sock.send_multipart(frames)
                for kind, _ in batch:
                    reply = sock.recv_multipart()  # raises zmq.Again on a missing reply
                    assert reply[0] == b"" and len(reply) == 2, (kind, reply)
                    header = json.loads(reply[1])
                    assert header["ok"] is False, (kind, header)
                    assert isinstance(header["error"], str) and header["error"], kind
                    kinds[kind] = kinds.get(kind, 0) + 1
                sent += len(batch)
        finally:
            sock.close()
            ctx.term()
        assert proc.poll() is None, "server died"
        assert sum(kinds.values()) == 10_000 and len(kinds) >= 25, kinds
        with ParamClient(addr, timeout_s=10) as ps:
            info = ps.table_info("w", checksum=True)
            assert info["shards"][0]["checksum"] == before
            assert info["step"] == 0 and info["optimizer"]["lr"] == 0.1
            assert ps.ping()[0]["tables"] == {"w": 0}  # no table was created
