"""scripts/gpu_check.sh (tools/gpu_check.py) on the CPU at tiny sizes: every step that does
not need CUDA runs for real, so the check itself is tested where no GPU is."""
import json
import subprocess
import sys

import pytest

from tests.ps_utils import ROOT

pytestmark = pytest.mark.timeout(900)


def test_the_gpu_check_runs_its_steps_on_the_cpu(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run(["sh", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu",
                           "--quick", "--work", str(work), "--timeout", "400"],
                          env={**__import__("os").environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=880, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["passed"] and "GPU CHECK PASSED" in proc.stdout
    assert summary["steps"] == ["environment", "data", "full", "fp16", "sampled_server",
                                "sampled_device", "sampled_dist", "extraction", "nccl", "gpu_tests",
                                "breakdown"]
    assert len(summary["skipped"]) == 3  # fp16, NCCL, pytest -m gpu: CUDA only
    figs = summary["figures"]
    for run in ("full_ir50_bf16", "hf_faiss_server", "hf_faiss_server_resumed", "hf_device",
                "hf_dist", "hf_dist_resumed"):
        assert figs[run]["loss"] > 0 and figs[run]["img_s"] > 0, run
    assert {"gpu_only_ms", "today_ms", "new_path_ms"} <= set(figs["step_breakdown"])


def test_a_failing_step_stops_the_check_naming_it(tmp_path):
    # a dataset that cannot be made: the data step fails and names its command and log
    work = tmp_path / "work"
    (work / "syn").mkdir(parents=True)
    (work / "syn" / "train.rec").write_bytes(b"not a set of ours")  # refused: not ours
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device",
                           "cpu", "--quick", "--work", str(work), "--only", "full"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert "GPU CHECK FAILED: synthetic: exit" in proc.stderr and "synthetic.log" in proc.stderr
    assert json.loads((work / "summary.json").read_text())["passed"] is False
