"""The trainer against careless and hostile input: run folders are owned (a lock, resumes of a
copy never write into the original), and every misuse of the command line exits 2 with one
line naming the bad value, no traceback."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from hfsoftmax.engine.runtime import LOCK_NAME
from hfsoftmax.train import main
from tests.ps_utils import ROOT
from tests.train_data import make_tiny_rec

pytestmark = pytest.mark.timeout(300)

TINY = ["--arch", "convnet-s", "--embedding-size", "16", "--batch-size", "8", "--workers",
        "0", "--threads", "1", "--print-freq", "1", "--head", "cosface", "--scale", "16",
        "--margin", "0.1"]


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    return make_tiny_rec(tmp_path_factory.mktemp("data") / "tiny", num_classes=12,
                         per_class=4, seed=5)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_resumed_copy_never_writes_into_the_original(tiny_rec, tmp_path):
    """The copy continues in its own folder (its own rows, its own pruning), whatever the
    checkpoint stores; the original's files stay byte-identical."""
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    hf = ["--sampled", "--sampler", "exact", "--sample-num", "12", "--interval", "2"]
    assert main(["--train-rec", tiny_rec, *TINY, *hf, "--max-steps", "4",
                 "--save-path", str(orig)]) == 0
    shutil.copytree(orig, copy)
    before = _files(orig)
    assert main(["--resume", str(copy), "--max-steps", "8", "--threads", "1"]) == 0
    assert _files(orig) == before
    ckpt = torch.load(copy / "last.pth", weights_only=True)
    assert ckpt["step"] == 8 and (copy / ckpt["ps_snapshot"]).is_file()
    assert not (copy / "rows_step000000004.safetensors").exists()  # pruned in the copy only
    # an edited checkpoint cannot pick the output folder or the server either
    ckpt["args"].update(save_path=str(orig), ps=["tcp://10.255.255.1:1"])
    torch.save(ckpt, copy / "edited.pth")
    assert main(["--resume", str(copy / "edited.pth"), "--max-steps", "9",
                 "--threads", "1"]) == 0
    assert _files(orig) == before
    assert torch.load(copy / "last.pth", weights_only=True)["step"] == 9


def _trainer(argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "hfsoftmax.train", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def test_a_held_run_folder_refuses_a_second_trainer_until_the_holder_dies(tiny_rec,
                                                                          tmp_path):
    save = tmp_path / "run"
    argv = ["--train-rec", tiny_rec, *TINY, "--max-steps", "100000", "--save-path", str(save)]
    holder = _trainer(argv)
    try:
        deadline = time.monotonic() + 120
        while not (save / "last.pth").exists():  # training (a checkpoint each epoch)
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline, "the first trainer wrote no checkpoint"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "hfsoftmax.train", "--resume",
                                 str(save), "--max-steps", "3"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"in use by another trainer (pid {holder.pid} on" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.splitlines()) == 1
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(30)
    # the killed holder's lock is gone with it: the next trainer takes the folder over
    step = torch.load(save / "last.pth", weights_only=True)["step"]
    third = subprocess.run([sys.executable, "-m", "hfsoftmax.train", "--resume", str(save),
                            "--max-steps", str(step + 2), "--threads", "1", "--workers", "0"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert torch.load(save / "last.pth", weights_only=True)["step"] == step + 2
    # and released it when it ended: the folder can be taken at once
    from hfsoftmax.engine.runtime import RunLock
    with RunLock(save):
        assert f"pid {os.getpid()} on" in (save / LOCK_NAME).read_text()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def _misuses(tiny_rec, tmp):
    """(name, argv, words the message must hold)."""
    hf = ["--sampled", "--sampler", "exact"]
    (tmp / "a_file").write_text("x")
    (tmp / "empty.pth").write_bytes(b"")
    good = tmp / "good"
    assert main(["--train-rec", tiny_rec, *TINY, "--max-steps", "1",
                 "--save-path", str(good)]) == 0
    (tmp / "truncated.pth").write_bytes((good / "last.pth").read_bytes()[:5000])
    torch.save({"model": _Evil()}, tmp / "evil.pth")
    with open(tmp / "pickled.pth", "wb") as f:
        pickle.dump(_Evil(), f)
    (tmp / "tag.yaml").write_text("lr: !!python/object/apply:os.system ['touch pwned']\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    no_rec = tmp / "no_rec"
    shutil.copytree(tiny_rec, no_rec)
    os.unlink(no_rec / "train.rec")
    run = ["--save-path", str(tmp / "out")]
    return [
        ("no data at all", [*TINY, *run], "no training data"),
        ("missing dataset", ["--train-rec", str(tmp / "nope"), *TINY, *run], "nope"),
        ("missing image list", ["--train-filelist", str(tmp / "nope.txt"), *TINY, *run],
         "nope.txt"),
        ("dataset without train.rec", ["--train-rec", str(no_rec), *TINY, *run], "train.rec"),
        ("save path is a file", ["--train-rec", tiny_rec, *TINY, "--save-path",
                                 str(tmp / "a_file")], "is a file"),
        ("empty --resume", ["--resume", str(tmp / "empty.pth"), *run], "empty.pth"),
        ("truncated --resume", ["--resume", str(tmp / "truncated.pth"), *run],
         "not a readable hfsoftmax checkpoint"),
        ("malicious --resume", ["--resume", str(tmp / "evil.pth"), *run],
         "not a readable hfsoftmax checkpoint"),
        ("plain pickle --resume", ["--resume", str(tmp / "pickled.pth"), *run],
         "not a readable hfsoftmax checkpoint"),
        ("--resume folder without last.pth", ["--resume", str(tmp), *run], "no last.pth"),
        ("batch larger than the dataset", ["--train-rec", tiny_rec, *TINY, "--batch-size",
                                           "1000", *run], "--batch-size 1000"),
        ("sample_num above the classes", ["--train-rec", tiny_rec, *TINY, *hf,
                                          "--sample-num", "50", *run],
         "--sample-num 50 exceeds the 12 classes"),
        ("--sample-num without --sampled", ["--train-rec", tiny_rec, *TINY, "--sample-num",
                                            "50", *run], "add --sampled"),
        ("YAML !!python tag", ["--config", str(tmp / "tag.yaml"), "--train-rec", tiny_rec,
                               *run], "not a plain YAML mapping"),
        ("YAML not a mapping", ["--config", str(tmp / "list.yaml"), *run],
         "expected a mapping"),
        ("missing --config", ["--config", str(tmp / "nope.yaml"), *run], "nope.yaml"),
        ("--device cuda without CUDA", ["--train-rec", tiny_rec, *TINY, "--device", "cuda",
                                        *run], "CUDA is not available"),
        ("missing --val-bins", ["--train-rec", tiny_rec, *TINY, "--val-bins",
                                str(tmp / "lfw.bin"), *run], "lfw.bin"),
        ("--ps without --sampled", ["--train-rec", tiny_rec, *TINY, "--ps",
                                    "tcp://127.0.0.1:1", *run], "add --sampled"),
        ("conflicting rule", ["--train-rec", tiny_rec, *TINY, *hf, "--row-momentum", "0.9",
                              *run], "--no-row-catchup-decay"),
        ("existing run without --resume", ["--train-rec", tiny_rec, *TINY, "--save-path",
                                           str(good)], "already holds a run"),
    ]


def test_every_misuse_exits_2_with_one_line(tiny_rec, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if torch.cuda.is_available():  # the cuda case needs a machine without CUDA
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = _misuses(tiny_rec, tmp_path)
    capsys.readouterr()
    for name, argv, words in cases:
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln]
        assert len(lines) == 1 and lines[0].startswith("hfsoftmax-train: error: "), (name, err)
        assert words in lines[0], (name, lines[0])
        assert "Traceback" not in err
    assert not (tmp_path / "pwned-by-checkpoint").exists() and not (tmp_path / "pwned").exists()


def test_the_console_entry_prints_one_line_and_exits_2(tiny_rec, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hfsoftmax.train", "--train-rec", tiny_rec,
                           *TINY, "--batch-size", "1000", "--save-path", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert errors == [ln for ln in proc.stderr.splitlines() if " INFO " not in ln]
    assert len(errors) == 1 and "--batch-size 1000" in errors[0]
