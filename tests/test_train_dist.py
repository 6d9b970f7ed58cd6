"""Distributed training: 2 torchrun processes (gloo) with a real parameter server equal one
process at twice the batch.

The backbone is ``convnet-s-gn`` (GroupNorm + LayerNorm: per-sample normalisation, so a
sample's embedding does not depend on which rank's batch it is in; BatchNorm's per-rank
statistics would make the runs differ by design). No augmentation, fixed seed, synchronous
index rebuilds, the linear head (the margin heads' normalised rows of norm ~0.06 at this tiny
dimension turn every step into a large rotation, so their 8-step trajectories amplify
float round-off). The sampled head selects its classes over the gathered global batch on
rank 0, so both runs select the same classes; the server averages the two workers' row
gradients and DDP the backbone's, which is the single process's gradient of the mean loss.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from hfsoftmax.train import main
from paramserver.snapshot import read_snapshot
from tests.ps_utils import ROOT, running_server

pytestmark = pytest.mark.timeout(300)

STEPS = 8
COMMON = ["--arch", "convnet-s-gn", "--embedding-size", "32", "--workers", "0",
          "--threads", "1", "--print-freq", "2", "--head", "linear", "--lr", "0.05",
          "--no-augment", "--seed", "3",
          "--max-steps", str(STEPS)]
# --sampled-rule paper: the rows' (lazy) momentum buffers are compared too
HF = ["--sampled", "--sampler", "exact", "--sample-num", "24", "--interval", "3",
      "--no-background-rebuild", "--recall-every", "4", "--sampled-rule", "paper"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc -m hfsoftmax.train args`` on this machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "hfsoftmax.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def load(out, rows_dir=None):
    """The checkpoint and its rows (a server's snapshot lies in its ``rows_dir``)."""
    ckpt = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    rows = None
    if ckpt["ps_snapshot"]:
        rows = read_snapshot(os.path.join(rows_dir or out, ckpt["ps_snapshot"]))[0][
            "classifier"]
    return ckpt, rows


def rel_err(a, b) -> float:
    """||a - b|| / ||a||: float round-off of different reduction orders stays ~1e-6."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def assert_close_runs(a, b, tol=1e-4, steps=STEPS):
    (ca, ra), (cb, rb) = a, b
    assert ca["step"] == cb["step"] == steps
    errs = {f"model.{k}": rel_err(v, cb["model"][k]) for k, v in ca["model"].items()
            if v.is_floating_point()}
    for k, st in ca["optimizer"]["state"].items():
        errs[f"momentum.{k}"] = rel_err(st["momentum_buffer"],
                                        cb["optimizer"]["state"][k]["momentum_buffer"])
    if ra is not None:
        assert ra.updates == rb.updates == steps
        errs["rows"] = rel_err(ra.weight, rb.weight)
        errs["rows.momentum"] = rel_err(ra.momentum, rb.momentum)
        # The training really moved the rows (not a comparison of two initial tables).
        assert np.abs(ra.momentum).max() > 1e-3
    else:
        errs["head"] = rel_err(ca["head"]["weight"], cb["head"]["weight"])
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, f"relative differences above {tol}: {bad}"
    return errs


def test_two_ranks_with_a_parameter_server_equal_one_process_at_twice_the_batch(
        tiny_rec, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    with running_server("--workers", "1") as (server1, address):
        assert main(["--train-rec", str(tiny_rec), *COMMON, *HF, "--batch-size", "16",
                     "--ps", address, "--save-path", one]) == 0
    with running_server("--workers", "2") as (server2, address):
        proc = torchrun(2, ["--train-rec", str(tiny_rec), *COMMON, *HF, "--batch-size", "8",
                            "--ps", address, "--save-path", two, "--dist-backend", "gloo"])
    assert "2 process(es) x batch 8" in proc.stderr
    assert_close_runs(load(one, server1.snapshot_dir), load(two, server2.snapshot_dir))
    # Only rank 0 writes files.
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".pth") == \
        ["last.pth"]


@pytest.mark.slow
def test_two_ranks_full_softmax_equal_one_process(tiny_rec, tmp_path):
    """The full head under DDP (its weight's gradient is averaged with the backbone's).

    4 steps: this run's trajectory is more sensitive, so float round-off (1e-6 after 1-3
    steps) grows to ~1e-3 in the SGD momentum by step 8, which is not what is tested here.
    """
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = [*COMMON, "--max-steps", "4"]
    assert main(["--train-rec", str(tiny_rec), *args, "--batch-size", "16",
                 "--save-path", one]) == 0
    torchrun(2, ["--train-rec", str(tiny_rec), *args, "--batch-size", "8", "--save-path", two])
    assert_close_runs(load(one), load(two), steps=4)
