"""Exercise hfsoftmax's CUDA / NCCL paths on one GPU, end to end, and fail loudly.

Run by ``scripts/gpu_check.sh`` (``sh scripts/gpu_check.sh``, under 10 minutes on one GPU).
Each step runs real commands (the trainer, a parameter server, extraction, evaluation,
torchrun) with a timeout, checks what they wrote, and records its figures; the first failure
stops the check with the step's name, the command and the tail of its log. Steps:

1. environment (CUDA, native bf16, NCCL, the index and ZeroMQ packages);
2. a small synthetic set;
3. full softmax, ``ir50``, ``--amp bf16``, validation on CUDA (checkpoint tensors on CUDA);
4. fp16 with the loss scaler, clipping and the poly schedule (``ir18``), then its resume;
5. the sampled head with a parameter server (faiss in its index process, split backward,
   the push on its thread, per-sample log-Q, recall), then its resume with ``--ps``;
6. the sampled head with the ``device`` sampler (the GPU default), fp16;
7. the sampled head over rows sharded over the ranks (``--row-store dist``; one process, so
   one shard: the shard's device copy and the sharded softmax on CUDA), then its resume;
8. extraction on CUDA equal to extraction on the CPU; evaluation on CUDA;
9. a 1-process NCCL group over the distributed helpers, the sampled head's distributed path
   and the sharded rows' head (each equal to its one-process path);
10. the GPU tests of the suite (``pytest -m gpu``: host-sync counts under CUDA's sync debug
    mode, the device sampler's copy);
11. ``benchmarks/step_breakdown.py`` on the GPU (measured, not projected).

``--device cpu --quick`` runs the same steps on the CPU at tiny sizes (CUDA-only checks
skipped, named in the summary): what ``tests/test_gpu_check.py`` runs, so the check itself
is tested where no GPU is. Writes ``summary.json`` (figures, steps, skips) in ``--work``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


class CheckFailed(RuntimeError):
    """A step failed; the message names it and what was wrong."""


class Check:
    """Runs the steps; ``self.figures`` collects what they measured."""

    def __init__(self, work: Path, device: str, quick: bool, timeout: int):
        self.work, self.device, self.quick, self.timeout = work, device, quick, timeout
        self.cuda = device == "cuda"
        self.figures: dict = {}
        self.steps: list[str] = []
        self.skipped: list[str] = []
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}"
                    f"{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
        self.syn = work / "syn"
        self.servers: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ helpers
    def run(self, name: str, *cmd, env: dict | None = None, timeout: int | None = None) -> str:
        """Run ``cmd``; its output goes to ``<work>/<name>.log``; a non-zero exit or a Python
        traceback fails the step."""
        log = self.work / f"{name}.log"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                  cwd=ROOT, env={**self.env, **(env or {})},
                                  timeout=timeout or self.timeout)
        text = log.read_text(errors="replace")
        if proc.returncode != 0 or "Traceback (most recent call last)" in text:
            tail = "\n".join(text.splitlines()[-40:])
            raise CheckFailed(f"{name}: exit {proc.returncode}: {' '.join(map(str, cmd))}\n"
                              f"--- last lines of {log}:\n{tail}")
        self.figures.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        return text

    def train(self, name: str, *flags, resume: str | None = None) -> Path:
        save = self.work / name
        base = ["--resume", str(resume)] if resume else ["--train-rec", self.syn]
        self.run(name, PY, "-m", "hfsoftmax.train", *base, "--device", self.device,
                 "--print-freq", "5", "--save-path", save, *flags)
        return save

    def check_run(self, save: Path, steps: int, sampled: bool = False) -> dict:
        """Finite losses, the last step, the checkpoint on the run's device, rows saved."""
        import torch

        rows = list(csv.DictReader(open(save / "metrics.csv", encoding="utf-8")))
        if not rows or any(not math.isfinite(float(r["loss"])) for r in rows):
            raise CheckFailed(f"{save}: metrics.csv missing or holding a non-finite loss")
        if int(rows[-1]["step"]) != steps:
            raise CheckFailed(f"{save}: last logged step {rows[-1]['step']}, expected {steps}")
        ck = torch.load(save / "last.pth", weights_only=True)
        devs = {t.device.type for t in ck["model"].values() if torch.is_tensor(t)}
        if devs != {self.device}:
            raise CheckFailed(f"{save}: checkpoint tensors on {devs}, not {self.device}")
        if f"device {self.device}" not in (save / "train.log").read_text():
            raise CheckFailed(f"{save}/train.log does not say device {self.device}")
        last = rows[-1]
        out = {"loss": float(last["loss"]), "img_s": float(last["img_s"]),
               "step_ms": 1e3 * float(last["step_s"])}
        if sampled:
            if not ck.get("ps_snapshot"):
                raise CheckFailed(f"{save}: the checkpoint names no row snapshot")
            for k in ("select_s", "pull_s", "push_s"):
                if last.get(k):
                    out[k.replace("_s", "_ms")] = 1e3 * float(last[k])
        return out

    def start_server(self, name: str, workers: int = 1) -> str:
        ready = self.work / f"{name}.address"
        log = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen([PY, str(ROOT / "paramserver" / "paramserver.py"), "--bind",
                                 "tcp://127.0.0.1:*", "--workers", str(workers),
                                 "--ready-file", str(ready), "--snapshot-dir",
                                 str(self.work / f"{name}-snapshots")],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        self.servers.append(proc)
        for _ in range(300):
            if ready.exists() and ready.read_text().strip():
                return ready.read_text().strip()
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise CheckFailed(f"parameter server {name} did not start: see {log.name}")

    def stop_servers(self) -> None:
        for p in self.servers:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.servers = []

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        print(f"  skipped: {what}", flush=True)

    # ------------------------------------------------------------------ the steps
    def environment(self) -> None:
        import torch

        env = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
        if self.cuda:
            if not torch.cuda.is_available():
                raise CheckFailed("CUDA is not available: this check needs a GPU (or run it "
                                  "with --device cpu --quick to test the check itself)")
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}",
                       memory_gib=round(p.total_memory / 2**30), cuda=torch.version.cuda,
                       native_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                       nccl=torch.distributed.is_nccl_available())
        for m in ("faiss", "annoy", "hnswlib", "zmq", "safetensors", "PIL", "onnxruntime"):
            __import__(m)
        self.figures["environment"] = env
        print(f"  {env}", flush=True)

    def data(self) -> None:
        n, per, pairs = (40, 4, 40) if self.quick else (1000, 8, 200)
        self.run("synthetic", PY, "datasets/prepare_synthetic.py", "--out", self.syn,
                 "--num-classes", n, "--images-per-class", per, "--pairs", pairs,
                 "--seed", "0", "--no-progress")

    def _net(self, big: str) -> list:
        return ["--arch", "convnet-s", "--embedding-size", "32", "--batch-size", "8",
                "--workers", "0"] if self.quick else ["--arch", big, "--embedding-size",
                                                      "512", "--batch-size", "128"]

    def full(self) -> None:
        amp = ["--amp", "bf16"] if self.cuda else []
        save = self.train("full", *self._net("ir50"), "--head", "arcface", *amp, "--lr",
                          "0.05", "--warmup-steps", "5", "--max-steps", "20",
                          "--save-every", "10", "--val-bins", self.syn / "synthetic.bin",
                          "--val-every", "10")
        self.figures["full_ir50_bf16"] = self.check_run(save, 20)
        if not (save / "val.csv").is_file():
            raise CheckFailed("the full-softmax run wrote no validation results")

    def fp16(self) -> None:
        if not self.cuda:
            self.skip("fp16 with the loss scaler (needs CUDA for float16 kernels)")
            return
        flags = [*self._net("ir18"), "--head", "cosface", "--amp", "fp16",
                 "--clip-grad-norm", "5", "--lr-schedule", "poly", "--warmup-steps", "3",
                 "--epochs", "1"]
        save = self.train("fp16", *flags, "--max-steps", "10", "--save-every", "10")
        self.figures["full_ir18_fp16"] = self.check_run(save, 10)
        import torch
        if not torch.load(save / "last.pth", weights_only=True).get("scaler"):
            raise CheckFailed("the fp16 checkpoint holds no loss-scaler state")
        self.train("fp16", "--max-steps", "15", "--amp", "fp16", resume=save)
        self.figures["full_ir18_fp16_resumed"] = self.check_run(save, 15)

    def sampled_server(self) -> None:
        addr = self.start_server("ps1")
        amp = ["--amp", "bf16"] if self.cuda else []
        flags = [*self._net("ir18"), "--head", "cosface", "--sampled", "--sampler", "faiss",
                 "--sampler-opt", "nprobe=8", "--sample-num", "16" if self.quick else "300",
                 "--interval", "5", "--recall-every", "5", "--ps", addr, *amp]
        save = self.train("hf_ps", *flags, "--max-steps", "20", "--save-every", "10")
        self.figures["hf_faiss_server"] = self.check_run(save, 20, sampled=True)
        log = (save / "train.log").read_text()
        for words in ("split backward", "index process"):
            if words not in log:
                raise CheckFailed(f"hf_ps/train.log does not mention {words!r}")
        self.train("hf_ps", "--max-steps", "25", "--ps", addr, *amp, resume=save)
        self.figures["hf_faiss_server_resumed"] = self.check_run(save, 25, sampled=True)

    def sampled_device(self) -> None:
        amp = ["--amp", "fp16"] if self.cuda else []
        save = self.train("hf_device", *self._net("ir18"), "--head", "cosface", "--sampled",
                          "--sampler", "device", "--sample-num", "16" if self.quick else "300",
                          "--interval", "5", *amp, "--max-steps", "20")
        self.figures["hf_device"] = self.check_run(save, 20, sampled=True)
        if "device sampler: copy of" not in (save / "train.log").read_text():
            raise CheckFailed("hf_device/train.log shows no device copy of the rows")

    def sampled_dist(self) -> None:
        amp = ["--amp", "bf16"] if self.cuda else []
        flags = [*self._net("ir18"), "--head", "cosface", "--sampled", "--row-store", "dist",
                 "--sample-num", "16" if self.quick else "300", "--interval", "5",
                 "--recall-every", "5"]
        save = self.train("hf_dist", *flags, *amp, "--max-steps", "20")
        self.figures["hf_dist"] = self.check_run(save, 20, sampled=True)
        if "rows sharded over the ranks" not in (save / "train.log").read_text():
            raise CheckFailed("hf_dist/train.log does not say the rows are sharded")
        self.train("hf_dist", "--row-store", "dist", "--max-steps", "25", *amp, resume=save)
        self.figures["hf_dist_resumed"] = self.check_run(save, 25, sampled=True)
        rows = sorted(p.name for p in save.glob("rows_step*"))
        if rows != ["rows_step000000025.safetensors"]:
            raise CheckFailed(f"hf_dist: row snapshots {rows}, expected the one of step 25")

    def extraction(self) -> None:
        import numpy as np

        ckpt = self.work / "full" / "last.pth"
        out = {}
        for dev in ([self.device, "cpu"] if self.cuda else ["cpu"]):
            npy = self.work / f"feat_{dev}.npy"
            env = {"CUDA_VISIBLE_DEVICES": ""} if dev == "cpu" and self.cuda else None
            self.run(f"extract_{dev}", PY, "-m", "hfsoftmax.extract", "--load-path", ckpt,
                     "--bin", self.syn / "synthetic.bin", "--out", npy, "--device", dev,
                     "--no-progress", env=env)
            out[dev] = np.load(npy)
        if self.cuda:
            cos = (out["cuda"] * out["cpu"]).sum(axis=1)
            self.figures["extract_cuda_vs_cpu_cosine_min"] = float(cos.min())
            if cos.min() < 0.995:
                raise CheckFailed(f"CUDA and CPU features differ: cosine min {cos.min():.5f}")
        self.run("eval", PY, "-m", "hfsoftmax.eval", "--load-path", ckpt, "--bins",
                 self.syn / "synthetic.bin", "--out-dir", self.work / "eval", "--device",
                 self.device, "--no-progress")

    def nccl(self) -> None:
        if not self.cuda:
            self.skip("the 1-process NCCL group (needs CUDA)")
            return
        self.run("nccl_world1", PY, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "1", ROOT / "tools" / "gpu_check_dist.py")

    def gpu_tests(self) -> None:
        if not self.cuda:
            self.skip("pytest -m gpu (needs CUDA)")
            return
        text = self.run("pytest_gpu", PY, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests",
                        timeout=max(self.timeout, 600))
        self.figures["pytest_gpu"] = text.strip().splitlines()[-1]

    def breakdown(self) -> None:
        out = self.work / "step_breakdown.json"
        self.run("step_breakdown", PY, "benchmarks/step_breakdown.py", "--out", out,
                 *(["--quick"] if self.quick else []), timeout=max(self.timeout, 600))
        self.figures["step_breakdown"] = json.loads(out.read_text()).get("projection")

    STEPS = ("environment", "data", "full", "fp16", "sampled_server", "sampled_device",
             "sampled_dist", "extraction", "nccl", "gpu_tests", "breakdown")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Exercise the CUDA/NCCL paths on one GPU.")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the test's CPU run)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temp dir)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per command")
    ap.add_argument("--only", nargs="+", choices=Check.STEPS, default=None,
                    help="run these steps only (data is always made)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="hf_gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(work, args.device, args.quick, args.timeout)
    t0, status = time.perf_counter(), 0
    try:
        for name in Check.STEPS:
            if args.only and name not in args.only and name not in ("environment", "data"):
                continue
            print(f"=== {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
            getattr(check, name)()
            check.steps.append(name)
    except (CheckFailed, subprocess.TimeoutExpired) as e:
        print(f"\n!!!!!!!! GPU CHECK FAILED: {e}\n!!!!!!!! logs: {work}", file=sys.stderr)
        status = 1
    finally:
        check.stop_servers()
        summary = {"passed": status == 0, "device": args.device, "quick": args.quick,
                   "steps": check.steps, "skipped": check.skipped, "figures": check.figures,
                   "seconds": round(time.perf_counter() - t0, 1), "work": str(work)}
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
    if status == 0:
        print(f"\n=== GPU CHECK PASSED: {len(check.steps)} steps in "
              f"{time.perf_counter() - t0:.0f} s ({len(check.skipped)} skipped); "
              f"{work / 'summary.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
