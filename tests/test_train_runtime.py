"""Where and how the trainer runs: the distributed backend follows the resolved device (a
machine with GPUs asked for --device cpu runs gloo and trains), --device cuda:N must be the
rank's own GPU under torchrun, and a resumed run takes its runtime settings (device,
workers, amp, ...) from the new command line, never from the checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch

from hfsoftmax.engine.config import parse_args
from hfsoftmax.engine.recipe import default_workers
from hfsoftmax.train import main
from tests.test_train_dist import torchrun
from tests.train_data import make_tiny_rec

pytestmark = pytest.mark.timeout(300)

TINY = ["--arch", "convnet-s", "--embedding-size", "16", "--batch-size", "8", "--threads",
        "1", "--print-freq", "1", "--head", "cosface", "--scale", "16", "--margin", "0.1"]


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    return str(make_tiny_rec(tmp_path_factory.mktemp("data") / "tiny", num_classes=12,
                             per_class=4, seed=5))


def test_device_cpu_on_a_cuda_machine_runs_gloo_under_torchrun(tiny_rec, tmp_path):
    """torch.cuda.is_available() patched to True (tests/fake_cuda_train.py), --device cpu, 2
    processes: the process group is gloo (NCCL would refuse the CPU tensors) and the run
    trains; the full head's weight is averaged by DDP over the two ranks as before."""
    import subprocess
    import sys

    from tests.ps_utils import ROOT
    from tests.test_train_dist import free_port

    save = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "tests.fake_cuda_train", "--train-rec", tiny_rec, *TINY, "--workers", "0",
         "--device", "cpu", "--max-steps", "3", "--ddp-static-graph", "--save-path", save],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = open(os.path.join(save, "train.log")).read()
    assert "process group: 2 ranks (gloo, timeout 1800s)" in log, log[-3000:]
    assert "device cpu" in log
    assert "2 process(es) x batch 8" in log
    ckpt = torch.load(os.path.join(save, "last.pth"), weights_only=True)
    assert ckpt["step"] == 3 and ckpt["args"]["device"] == "cpu"


def _fake_torchrun(monkeypatch, local_rank: int):
    for k, v in {"WORLD_SIZE": "2", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("argv,words", [
    (["--device", "cuda:1"], "--device cuda:1 under torchrun: this process is LOCAL_RANK 0"),
    (["--device", "cuda:5"], "this machine has 2 GPU(s)"),
    (["--device", "cpu", "--dist-backend", "nccl"], "nccl backend moves only CUDA tensors"),
    (["--device", "cpu", "--sync-bn"], "--sync-bn needs GPUs"),
])
def test_a_device_that_is_not_this_ranks_exits_2_with_one_line(argv, words, tiny_rec,
                                                                tmp_path, capsys, monkeypatch):
    """Checked before the process group starts (nothing would answer at MASTER_PORT 1)."""
    _fake_torchrun(monkeypatch, 0)
    assert main(["--train-rec", tiny_rec, *TINY, *argv, "--save-path",
                 str(tmp_path / "r")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hfsoftmax-train: error: "), lines
    assert words in lines[0], lines[0]


def test_a_resumed_run_takes_device_workers_and_amp_from_the_new_command_line(tiny_rec,
                                                                              tmp_path):
    """The checkpoint stores the first run's --device cpu --workers 0 --amp bf16 (and the
    recipe's runtime switches); the resumed run keeps what its own command line says, and
    the defaults where it says nothing, never the checkpoint's."""
    save = tmp_path / "run"
    first = ["--device", "cpu", "--workers", "0", "--amp", "bf16", "--no-split-backward",
             "--decoder", "pil", "--dist-timeout", "60"]
    assert main(["--train-rec", tiny_rec, *TINY, *first, "--max-steps", "2",
                 "--save-path", str(save)]) == 0
    stored = torch.load(save / "last.pth", weights_only=True)["args"]
    assert (stored["device"], stored["workers"], stored["amp"], stored["decoder"]) == \
        ("cpu", 0, "bf16", "pil")
    args = parse_args(["--resume", str(save)])
    assert (args.device, args.workers, args.amp, args.split_backward, args.decoder,
            args.dist_timeout) == ("auto", None, "off", True, "torchvision", 1800.0)
    assert main(["--resume", str(save), "--max-steps", "3", "--workers", "1", "--amp",
                 "fp16", "--threads", "1"]) == 0
    settings = json.loads((save / "args.json").read_text())
    assert (settings["device"], settings["workers"], settings["amp"]) == ("auto", 1, "fp16")
    assert torch.load(save / "last.pth", weights_only=True)["step"] == 3
    # --workers left out: this rank's cores less one (0 on one core), resolved and stored
    assert main(["--resume", str(save), "--max-steps", "4", "--threads", "1"]) == 0
    assert json.loads((save / "args.json").read_text())["workers"] == default_workers()


def test_recall_telemetry_is_off_past_100k_classes_unless_asked_for():
    from hfsoftmax.engine.recipe import resolve_recall_every

    args = parse_args(["--train-rec", "x", "--sampled"])
    assert args.recall_every is None
    assert resolve_recall_every(args, 100_000) == 200
    assert resolve_recall_every(args, 100_001) == 0
    args = parse_args(["--train-rec", "x", "--sampled", "--recall-every", "50"])
    assert resolve_recall_every(args, 2_000_000) == 50


def test_the_index_process_gets_the_cores_per_process_not_torchruns_one(tiny_rec,
                                                                        monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 for the trainer; without --index-threads the index
    process gets this host's cores over its processes instead."""
    from hfsoftmax.engine.recipe import cores_per_process
    from hfsoftmax.heads.factory import build_head_from_args
    from hfsoftmax.heads.sampled_config import rule_from_args

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    args = parse_args(["--train-rec", tiny_rec, *TINY, "--sampled", "--sampler", "exact",
                       "--sample-num", "12", "--sampler-process"])
    head, _ = build_head_from_args(args, 12, rule_from_args(args))
    try:
        with open(f"/proc/{head.sampler.pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert env.get(b"OMP_NUM_THREADS") == str(cores_per_process()).encode()
    finally:
        head.sampler.close()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more processes than cores: 1 each
    assert cores_per_process() == 1
