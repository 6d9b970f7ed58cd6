"""Checkpoints written before the sampled head's rule had one home (main at 05ca052,
tests/fixtures/legacy_05ca052) still resume, and continue exactly as that code continued
them."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hfsoftmax.engine.config import parse_args
from hfsoftmax.heads.sampled_config import rule_from_args
from hfsoftmax.train import main
from paramserver.snapshot import read_snapshot
from tests.ps_utils import ROOT
from tests.train_data import make_tiny_rec

pytestmark = pytest.mark.timeout(300)

FIXTURES = ROOT / "tests" / "fixtures" / "legacy_05ca052"


@pytest.fixture(scope="module")
def legacy_data(tmp_path_factory):
    # the set the fixtures were trained on (make.py): regenerated, it is byte-identical
    return make_tiny_rec(tmp_path_factory.mktemp("legacy") / "data", num_classes=12,
                         per_class=4, seed=3)


def _sums(folder):
    ck = torch.load(folder / "last.pth", weights_only=True)
    floats = [v.double() for v in ck["model"].values() if v.is_floating_point()]
    out = {"step": ck["step"], "model_sum": sum(float(v.sum()) for v in floats),
           "model_abs_sum": sum(float(v.abs().sum()) for v in floats)}
    if ck["ps_snapshot"]:
        w = np.asarray(read_snapshot(folder / ck["ps_snapshot"])[0]["classifier"].weight,
                       np.float64)
        out.update(rows_sum=float(w.sum()), rows_abs_sum=float(np.abs(w).sum()))
    return out


@pytest.mark.parametrize("name", ["sampled_cosface", "full_linear"])
def test_a_checkpoint_of_05ca052_resumes_as_it_did_there(name, legacy_data, tmp_path):
    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)
    before = {p.name: p.read_bytes() for p in (FIXTURES / name).iterdir()}
    args = parse_args(["--resume", str(run), "--train-rec", legacy_data])
    assert args.save_path == str(run)  # continues in the folder holding the checkpoint
    if name == "sampled_cosface":
        rule = rule_from_args(args)  # what 05ca052 resolved: cap + every-step decay ...
        assert (rule.row_lr_mult, rule.row_momentum, rule.max_norm_rows,
                rule.row_catchup_decay, rule.logq) == (pytest.approx(10.0), 0.0, 1.0, True,
                                                       "sample")
        assert rule.fresh_rows == 20  # ... and its fresh rows: --interval 2 x --sample-num 10
    # runtime flags are this command line's (05ca052 took --threads 1 from the checkpoint)
    assert main(["--resume", str(run), "--train-rec", legacy_data, "--max-steps", "6",
                 "--threads", "1", "--workers", "0"]) == 0
    want = json.loads((FIXTURES / "expected_resume.json").read_text())[name]
    got = _sums(run)
    assert got["step"] == want["step"] == 6
    assert got == pytest.approx(want, rel=1e-9), (got, want)
    # the fixture it was copied from is untouched
    assert {p.name: p.read_bytes() for p in (FIXTURES / name).iterdir()} == before
