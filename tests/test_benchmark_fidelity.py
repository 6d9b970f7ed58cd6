"""benchmarks/sampled_fidelity.py: the per-sample comparison of a sampled softmax with the
full one, on random rows (where the answers are known) and end to end on a trained model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hfsoftmax.heads.logits import LogitSpec
from tests.bench_utils import ROOT, import_benchmark
from tests.train_data import make_tiny_rec

SCRIPT = ROOT / "benchmarks" / "sampled_fidelity.py"
pytestmark = pytest.mark.timeout(300)


def _clustered(n=300, d=16, images=120, seed=0):
    """Rows in tight groups of 5 (look-alikes) and features near their own row."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 5, d))
    rows = np.repeat(centres, 5, axis=0) + 0.3 * rng.normal(size=(n, d))
    labels = rng.integers(0, n, images)
    feats = rows[labels] + 0.5 * rng.normal(size=(images, d))
    return feats.astype(np.float32), labels, rows.astype(np.float32)


def test_every_class_selected_is_the_full_softmax():
    sf = import_benchmark("sampled_fidelity")
    feats, labels, rows = _clustered()
    res = sf.fidelity(feats, labels, rows, LogitSpec("cosface", 16.0, 0.1), 300, 20, 0.5)
    assert set(res) == {"plain", "random", "sample"}
    for figures in res.values():
        assert abs(figures["loss_minus_full_mean"]) < 1e-4
        assert figures["loss_minus_full_std"] < 1e-4
        assert figures["grad_cos_median"] > 0.9999
        assert figures["grad_norm_ratio_median"] == pytest.approx(1.0, abs=1e-4)


def test_a_small_selection_falls_short_and_the_corrections_make_up_for_it():
    """With 40 of 300 classes the plain loss is below the full one for every sample (a
    normaliser with fewer terms) and the feature gradients are too short; both corrections
    bring the mean loss and the gradient norm closer to the full softmax's."""
    sf = import_benchmark("sampled_fidelity")
    feats, labels, rows = _clustered()
    spec = LogitSpec("cosface", 16.0, 0.1)
    res = sf.fidelity(feats, labels, rows, spec, 40, 20, 0.5)
    plain = res["plain"]
    assert plain["loss_minus_full_mean"] < -0.05 and plain["grad_norm_ratio_median"] < 0.95
    for c in ("random", "sample"):
        assert abs(res[c]["loss_minus_full_mean"]) < abs(plain["loss_minus_full_mean"])
        assert abs(1 - res[c]["grad_norm_ratio_median"]) < \
            abs(1 - plain["grad_norm_ratio_median"])
    # the paper's rule (no random share) has no random top-up to correct: no "random" figures
    assert set(sf.fidelity(feats, labels, rows, spec, 40, 20, 0.0)) == {"plain", "sample"}
    # per-sample losses and gradients are those of torch's cross-entropy on each sample
    x, w = torch.from_numpy(feats[:3]), torch.from_numpy(rows)
    y = torch.from_numpy(labels[:3])
    loss, grad = sf.per_sample_loss_and_grad(spec, x, w, y)
    for i in range(3):
        xi = x[i:i + 1].clone().requires_grad_()
        li = torch.nn.functional.cross_entropy(spec(xi, w, y[i:i + 1]), y[i:i + 1])
        li.backward()
        torch.testing.assert_close(loss[i], li.detach())
        torch.testing.assert_close(grad[i], xi.grad[0])


def test_command_line_on_a_trained_sampled_run(tmp_path):
    from hfsoftmax.train import main as train

    data = make_tiny_rec(tmp_path / "tiny", num_classes=40, per_class=4, seed=1)
    run = tmp_path / "run"
    assert train(["--train-rec", str(data), "--arch", "convnet-s", "--embedding-size", "32",
                  "--batch-size", "16", "--workers", "0", "--threads", "1", "--head",
                  "cosface", "--scale", "16", "--margin", "0.1", "--max-steps", "20",
                  "--sampled", "--sampler", "exact", "--sample-num", "24",
                  "--save-path", str(run)]) == 0
    out = tmp_path / "fid.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(run / "last.pth"),
                           "--images", "64", "--sample-nums", "24", "40", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed, written = json.loads(proc.stdout), json.loads(out.read_text())
    assert printed == written
    assert written["config"]["batch_size"] == 16 and written["config"]["num_classes"] == 40
    assert written["trained_with"]["sample_num"] == 24
    assert set(written["results"]) == {f"sample_num={n}/random_share={r}"
                                       for n in (24, 40) for r in (0.0, 0.5)}
    full = written["results"]["sample_num=40/random_share=0.0"]["plain"]
    assert abs(full["loss_minus_full_mean"]) < 1e-4 and full["grad_cos_median"] > 0.9999
    assert written["results"]["sample_num=24/random_share=0.0"]["plain"][
        "loss_minus_full_mean"] < 0
    bad = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(run / "last.pth"),
                          "--images", "64", "--sample-nums", "8"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "--sample-nums 8" in bad.stderr
