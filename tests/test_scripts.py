"""Each training script runs on CPU at tiny size (real processes: torchrun with gloo, real
parameter servers), including the no-argument demo of scripts/train_hf.sh."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from tests.ps_utils import ROOT, running_server
from tests.train_data import make_tiny_rec

pytestmark = pytest.mark.timeout(300)

SCRIPTS = ROOT / "scripts"
TINY = ["--arch", "convnet-s", "--embedding-size", "16", "--batch-size", "8", "--workers",
        "0", "--threads", "1", "--print-freq", "1", "--max-steps", "3"]
HF = ["--sampler", "exact", "--sample-num", "16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(name: str, *args: str, env: dict | None = None, check: bool = True,
               timeout: float = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "MASTER_PORT": str(free_port()), **(env or {})}
    full_env.pop("PS_ADDR", None) if "PS_ADDR" not in (env or {}) else None
    proc = subprocess.run(["bash", str(SCRIPTS / name), *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}"
                             f"\nstderr:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    return str(make_tiny_rec(tmp_path_factory.mktemp("data") / "tiny", num_classes=20,
                             per_class=4, seed=2))


def ckpt_of(save):
    return torch.load(os.path.join(save, "last.pth"), weights_only=True)


def server_pid(save) -> int:
    log = open(os.path.join(save, "paramserver.log")).read()
    return int(re.search(r"paramserver\[(\d+)\]", log).group(1))


def assert_gone(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    # a zombie of an exited child also counts as stopped
    with open(f"/proc/{pid}/status") as f:
        assert "zombie" in f.read().lower(), f"parameter server {pid} still running"


def test_scripts_are_strict_and_pass_arguments_through():
    for name in ("train.sh", "train_hf.sh", "train_dist.sh", "train_dist_hf.sh",
                 "test_distributed.sh"):
        text = (SCRIPTS / name).read_text()
        assert "set -euo pipefail" in text and '"$@"' in text, name
    proc = run_script("train.sh", check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_train_sh_full_softmax(tiny_rec, tmp_path):
    save = str(tmp_path / "full")
    run_script("train.sh", tiny_rec, *TINY, env={"SAVE_PATH": save})
    ckpt = ckpt_of(save)
    assert ckpt["step"] == 3 and not ckpt["args"]["sampled"] and ckpt["ps_snapshot"] is None


def test_train_hf_sh_starts_and_stops_its_own_server(tiny_rec, tmp_path):
    save = str(tmp_path / "hf")
    proc = run_script("train_hf.sh", tiny_rec, *TINY, *HF, env={"SAVE_PATH": save})
    assert "started a parameter server at tcp://127.0.0.1:" in proc.stdout
    ckpt = ckpt_of(save)
    assert ckpt["args"]["sampled"] and ckpt["args"]["ps"][0].startswith("tcp://127.0.0.1:")
    assert os.path.isfile(ckpt["ps_snapshot"])
    assert_gone(server_pid(save))


def test_train_hf_sh_uses_ps_addr(tiny_rec, tmp_path):
    save = str(tmp_path / "hf")
    with running_server() as (_, address):
        proc = run_script("train_hf.sh", tiny_rec, *TINY, *HF,
                          env={"SAVE_PATH": save, "PS_ADDR": address})
        from paramserver import ParamClient

        with ParamClient(address) as c:
            assert c.table_info("classifier")["step"] == 3  # trained on that server
    assert f"using the parameter server at {address}" in proc.stdout
    assert not os.path.exists(os.path.join(save, "paramserver.log"))
    bad = run_script("train_hf.sh", tiny_rec, *TINY, check=False,
                     env={"SAVE_PATH": str(tmp_path / "x"),
                          "PS_ADDR": f"tcp://127.0.0.1:{free_port()}"})
    assert bad.returncode == 1 and "no parameter server answers" in bad.stderr


@pytest.mark.slow
def test_train_dist_sh_two_processes(tiny_rec, tmp_path):
    save = str(tmp_path / "dist")
    proc = run_script("train_dist.sh", tiny_rec, *TINY, env={"SAVE_PATH": save, "NPROC": "2"})
    assert "2 process(es) x batch 8" in proc.stderr
    assert ckpt_of(save)["step"] == 3


@pytest.mark.slow
def test_train_dist_hf_sh_two_workers_of_one_server(tiny_rec, tmp_path):
    save = str(tmp_path / "disthf")
    proc = run_script("train_dist_hf.sh", tiny_rec, *TINY, *HF,
                      env={"SAVE_PATH": save, "NPROC": "2"})
    assert "2 process(es) x batch 8" in proc.stderr
    log = open(os.path.join(save, "paramserver.log")).read()
    assert "live workers [0, 1]" in log or "workers [0, 1]" in log
    ckpt = ckpt_of(save)
    assert ckpt["step"] == 3 and os.path.isfile(ckpt["ps_snapshot"])
    assert_gone(server_pid(save))


def test_test_distributed_sh_gloo():
    proc = run_script("test_distributed.sh", env={"NPROC": "2"})
    assert "distributed check passed: 2 processes, backend gloo" in proc.stdout


@pytest.mark.slow
def test_train_hf_sh_without_a_dataset_runs_the_demo(tmp_path):
    """The one-command demo at toy size: synthetic data, own server, train, verify, paths."""
    save, data = tmp_path / "demo", tmp_path / "synthetic"
    proc = run_script("train_hf.sh", "--max-steps", "4", "--batch-size", "16",
                      "--sample-num", "24", "--threads", "1", "--workers", "0",
                      env={"SAVE_PATH": str(save), "SYNTHETIC_DIR": str(data),
                           "DEMO_CLASSES": "40", "DEMO_PAIRS": "40"})
    out = proc.stdout
    assert (data / "train.rec").is_file() and (data / "synthetic.bin").is_file()
    assert "Demo finished." in out
    assert re.search(r"synthetic\s+40\s+\d+\.\d+ ±", out), out  # the eval table row
    for rel in ("best.pth", "last.pth", "train.log", "metrics.csv", "tb",
                "eval/synthetic_roc.png", "eval/synthetic.json"):
        assert (save / rel).exists(), rel
        assert str(save / rel.split("/")[0]) in out or rel in out
    assert_gone(server_pid(save))
