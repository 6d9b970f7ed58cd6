"""Each training script runs on CPU at tiny size (real processes: torchrun with gloo, real
parameter servers), including the no-argument demo of scripts/train_hf.sh.

The scripts run under ``sh`` as the docs show it (`sh scripts/train_hf.sh`), which on Debian
is dash: POSIX sh, no bash features. Every script in scripts/ also answers --help under sh
and bash, and the ones that need arguments print their usage with exit status 2."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from tests.ps_utils import ROOT, running_server
from tests.train_data import make_tiny_rec

pytestmark = pytest.mark.timeout(300)

SCRIPTS = ROOT / "scripts"
ALL_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.sh"))
TINY = ["--arch", "convnet-s", "--embedding-size", "16", "--batch-size", "8", "--workers",
        "0", "--threads", "1", "--print-freq", "1", "--max-steps", "3"]
HF = ["--sampler", "exact", "--sample-num", "16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def posix_sh() -> str:
    """/bin/sh where it is dash (Debian's); else dash where installed; else /bin/sh."""
    if os.path.basename(os.path.realpath("/bin/sh")) == "dash":
        return "/bin/sh"
    return shutil.which("dash") or "/bin/sh"


SH = posix_sh()
SHELLS = [SH, "bash"]


def run_script(name: str, *args: str, env: dict | None = None, check: bool = True,
               timeout: float = 240, shell: str = SH) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "MASTER_PORT": str(free_port()), **(env or {})}
    full_env.pop("PS_ADDR", None) if "PS_ADDR" not in (env or {}) else None
    proc = subprocess.run([shell, str(SCRIPTS / name), *args], env=full_env,
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


def test_sh_is_not_bash():
    """`sh` here is Debian's dash, or dash itself: the scripts are checked as POSIX sh."""
    out = subprocess.run([SH, "-c", 'echo "${BASH_VERSION:-none}"'], capture_output=True,
                         text=True, timeout=10).stdout.strip()
    if out != "none":
        pytest.skip(f"POSIX sh NOT checked: {SH} is bash {out} and dash is not installed")


def test_scripts_are_strict_posix_sh_and_pass_arguments_through():
    assert {"train.sh", "train_hf.sh", "train_dist.sh", "train_dist_hf.sh", "eval.sh",
            "extract_feat.sh", "test_distributed.sh", "start_paramserver.sh",
            "_torchrun.sh"} <= set(ALL_SCRIPTS)
    for name in ALL_SCRIPTS:
        text = (SCRIPTS / name).read_text()
        assert text.startswith("#!/bin/sh\n") and "Shell: POSIX sh" in text, name
        if name != "_torchrun.sh":  # sourced by the others, under their `set -eu`
            assert "\nset -eu\n" in text and '"$@"' in text, name
        for bashism in ("pipefail", "BASH_SOURCE", "[[", "read -a", "<<<", "source ",
                        "function "):
            assert bashism not in text, (name, bashism)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_every_script_answers_help(name, shell):
    """--help prints the script's header and exits 0, starting no Python (PYTHON=false),
    except start_paramserver.sh whose every argument, --help too, is the server's."""
    env = {} if name == "start_paramserver.sh" else {"PYTHON": "false"}
    proc = run_script(name, "--help", env=env, shell=shell, timeout=60)
    if name == "start_paramserver.sh":
        assert "--snapshot-dir" in proc.stdout
    else:
        lines = proc.stdout.splitlines()
        assert "Shell: POSIX sh" in proc.stdout and "set -eu" not in proc.stdout
        assert lines[0] and not any(line.startswith("#") for line in lines), lines
    assert proc.stderr == ""


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("name", ["train.sh", "train_dist.sh", "train_dist_hf.sh", "eval.sh",
                                  "extract_feat.sh", "_torchrun.sh"])
def test_scripts_that_need_arguments_print_usage_and_exit_2(name, shell):
    proc = run_script(name, env={"PYTHON": "false"}, shell=shell, check=False, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert ("usage" in proc.stderr) if name != "_torchrun.sh" else "not run" in proc.stderr


@pytest.mark.parametrize("how", ["--save-path", "--save-path=", "--resume", "SAVE_PATH"])
def test_train_hf_sh_gives_its_server_the_runs_folder(how, tmp_path):
    """The folder the server it starts is confined to is the run's: SAVE_PATH, the
    --save-path flag, or the folder of a --resume checkpoint (never runs/train_hf then)."""
    run = tmp_path / "run"
    run.mkdir()
    args, env = ["data"], {"PYTHON": "false"}   # the server cannot start: its log is left
    if how == "--save-path":
        args += ["--save-path", str(run)]
    elif how == "--save-path=":
        args += [f"--save-path={run}"]
    elif how == "--resume":
        args += ["--resume", str(run / "last.pth")]
    else:
        env["SAVE_PATH"] = str(run)
    proc = run_script("train_hf.sh", *args, env=env, check=False, timeout=60)
    assert proc.returncode != 0 and "did not start" in proc.stderr
    assert (run / "paramserver.log").is_file(), proc.stderr


def test_train_dist_checks_the_torchrun_settings():
    bad = run_script("train_dist.sh", "data", env={"NPROC": "2", "MASTER_ADDR": "a b"},
                     check=False, timeout=60)
    assert bad.returncode == 2 and "'a b'" in bad.stderr
    bad = run_script("train_dist_hf.sh", "data", env={"NPROC": "auto"}, check=False,
                     timeout=60)
    assert bad.returncode == 2 and "NPROC must be a number" in bad.stderr


@pytest.fixture(scope="module")
def full_run(tiny_rec, tmp_path_factory):
    """scripts/train.sh under sh: 3 steps of full softmax on the tiny set."""
    save = str(tmp_path_factory.mktemp("runs") / "full")
    run_script("train.sh", tiny_rec, *TINY, env={"SAVE_PATH": save})
    return save


def test_train_sh_full_softmax(full_run):
    ckpt = ckpt_of(full_run)
    assert ckpt["step"] == 3 and not ckpt["args"]["sampled"] and ckpt["ps_snapshot"] is None


def test_eval_sh_under_sh(full_run, shared_fixtures, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shared_fixtures / "verification-py2.bin", data / "lfw.bin")
    out = tmp_path / "eval"
    proc = run_script("eval.sh", "convnet-s", os.path.join(full_run, "last.pth"), str(data),
                      str(out), "--batch-size", "8", "--no-progress")
    assert re.search(r"^lfw\s+20\s", proc.stdout, re.M), proc.stdout
    assert (out / "lfw.json").is_file()


def test_extract_feat_sh_under_sh(full_run, tmp_path):
    import numpy as np
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (112, 112), (40 * i, 80, 120)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "list.txt").write_text("".join(f"{i}.jpg {i}\n" for i in range(3)))
    out = tmp_path / "f.npy"
    run_script("extract_feat.sh", str(tmp_path), str(tmp_path / "list.txt"),
               os.path.join(full_run, "last.pth"), str(out), "--batch-size", "2")
    feats = np.load(out)
    assert feats.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)


def test_train_hf_sh_starts_and_stops_its_own_server(tiny_rec, tmp_path):
    save = str(tmp_path / "hf")
    # PYTHON is a wrapper that logs each command line, to see the server's flags
    calls = tmp_path / "calls.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{calls}"\n'
                       f'exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    proc = run_script("train_hf.sh", tiny_rec, *TINY, *HF,
                      env={"SAVE_PATH": save, "PYTHON": str(wrapper)})
    assert "started a parameter server at tcp://127.0.0.1:" in proc.stdout
    ckpt = ckpt_of(save)
    assert ckpt["args"]["sampled"] and ckpt["args"]["ps"][0].startswith("tcp://127.0.0.1:")
    # the rows: named inside the server's snapshot folder, which is the run's
    assert not os.path.isabs(ckpt["ps_snapshot"])
    assert os.path.isfile(os.path.join(save, ckpt["ps_snapshot"]))
    assert_gone(server_pid(save))
    # the server it started writes snapshots only inside the run's folder
    server = [c for c in calls.read_text().splitlines() if "paramserver.py" in c]
    assert len(server) == 1 and f"--snapshot-dir {save} " in server[0], server


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
    assert ckpt["step"] == 3 and os.path.isfile(os.path.join(save, ckpt["ps_snapshot"]))
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


@pytest.mark.parametrize("form", ["--config FILE DATASET", "--config=FILE DATASET",
                                  "DATASET --config FILE"])
def test_train_hf_sh_takes_a_config_before_or_after_the_dataset(form, tiny_rec, tmp_path):
    """scripts/train_hf.sh --config X.yaml DATASET (a preset's way): the file's settings
    reach the trainer, DATASET replaces the file's train-rec, flags after DATASET win."""
    cfg = tmp_path / "preset.yaml"
    cfg.write_text("train-rec: /nonexistent/ms1m\narch: convnet-s\nembedding-size: 16\n"
                   "lr-schedule: cosine\nepochs: 2\nclip-grad-norm: 5\nbatch-size: 99\n"
                   "sampler: exact\nsample-num: 16\n")
    save = str(tmp_path / "hf")
    flags = ["--batch-size", "8", "--workers", "0", "--threads", "1", "--max-steps", "2"]
    words = form.replace("FILE", str(cfg)).replace("DATASET", tiny_rec)
    args = words.split(" ")
    if form.startswith("--config=FILE"):
        args = [f"--config={cfg}", tiny_rec]
    run_script("train_hf.sh", *args, *flags, env={"SAVE_PATH": save})
    got = ckpt_of(save)["args"]
    assert (got["train_rec"], got["lr_schedule"], got["clip_grad_norm"], got["batch_size"],
            got["embedding_size"]) == (tiny_rec, "cosine", 5.0, 8, 16)
    assert ckpt_of(save)["step"] == 2


@pytest.mark.parametrize("name", ["train.sh", "train_dist.sh", "train_dist_hf.sh"])
def test_a_config_without_a_dataset_is_a_usage_error(name):
    proc = run_script(name, "--config", "x.yaml", env={"PYTHON": "false"}, check=False,
                      timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr and "--config FILE.yaml" in \
        proc.stderr, proc


def test_train_sh_takes_a_config_before_the_dataset(tiny_rec, tmp_path):
    cfg = tmp_path / "full.yaml"
    cfg.write_text("arch: convnet-s\nembedding-size: 16\nlr-schedule: poly\nepochs: 2\n")
    save = str(tmp_path / "full")
    run_script("train.sh", "--config", str(cfg), tiny_rec, "--batch-size", "8", "--workers",
               "0", "--threads", "1", "--max-steps", "2", env={"SAVE_PATH": save})
    got = ckpt_of(save)["args"]
    assert (got["lr_schedule"], got["train_rec"], got["sampled"]) == ("poly", tiny_rec, False)
