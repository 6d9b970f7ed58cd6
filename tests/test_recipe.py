"""The GPU recipe on CPU: schedules against their closed forms, float16 with the loss scaler
(an overflowing step is skipped and the scale halves; the sampled rows still step),
gradient clipping, and an exact resume in the middle of a poly schedule with fp16 and
clipping on."""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from hfsoftmax.engine.config import parse_args
from hfsoftmax.engine.optim import Precision, build_optimizer, clip_backbone
from hfsoftmax.engine.schedule import LRSchedule, StepSchedule, schedule_from_args
from hfsoftmax.engine.step import TrainStep
from hfsoftmax.heads import FullHead, SampledHead
from hfsoftmax.heads.push import ThreadedRowStore
from hfsoftmax.rowstore import LocalRowStore, SGDConfig
from hfsoftmax.samplers import build_sampler
from hfsoftmax.train import main
from paramserver.snapshot import read_snapshot

pytestmark = pytest.mark.timeout(300)

torch.set_num_threads(1)

TINY = ["--arch", "convnet-s", "--embedding-size", "32", "--batch-size", "16", "--workers",
        "0", "--threads", "1", "--print-freq", "1", "--head", "cosface", "--scale", "16",
        "--margin", "0.1", "--lr", "0.1"]


# ---------------------------------------------------------------------------- schedules
def test_poly_and_cosine_equal_their_closed_forms_at_5_steps():
    base, floor = 0.2, 0.01
    poly = LRSchedule("poly", base, total_steps=5, power=2.0)
    cos = LRSchedule("cosine", base, total_steps=5, min_lr=floor)
    for s in range(5):
        assert poly.lr_at(s) == pytest.approx(base * (1 - s / 5) ** 2, rel=1e-12)
        assert cos.lr_at(s) == pytest.approx(floor + (base - floor) * 0.5 *
                                             (1 + math.cos(math.pi * s / 5)), rel=1e-12)
    assert poly.lr_at(5) == 0.0 and poly.lr_at(99) == 0.0   # ends at --min-lr, stays there
    assert cos.lr_at(5) == pytest.approx(floor)
    # warm-up over 2 steps, then the decay over the 3 left
    warm = LRSchedule("poly", base, total_steps=5, warmup_steps=2, power=1.0)
    assert [warm.lr_at(s) for s in range(5)] == pytest.approx(
        [base * 1 / 2, base * 2 / 2, base, base * 2 / 3, base * 1 / 3])
    # the step schedule is StepSchedule's, warm-up included
    old = StepSchedule(0.1, [3, 4], 0.1, warmup_steps=2)
    new = LRSchedule("step", 0.1, milestones=[3, 4], gamma=0.1, warmup_steps=2)
    assert [new.lr_at(s) for s in range(6)] == [old.lr_at(s) for s in range(6)]
    with pytest.raises(ValueError, match="Unknown LR schedule 'exp'.*poly"):
        LRSchedule("exp", 0.1)


def test_schedule_flags_resolve_from_epochs_and_are_checked(tiny_rec):
    args = parse_args(["--train-rec", str(tiny_rec), "--lr-schedule", "cosine", "--epochs",
                       "4", "--warmup-epochs", "0.5"])
    sched = schedule_from_args(args, steps_per_epoch=10)
    assert (sched.kind, sched.total_steps, sched.warmup_steps) == ("cosine", 40, 5)
    for argv, match in ((["--warmup-steps", "3", "--warmup-epochs", "1"], "not both"),
                        (["--lr-schedule", "poly", "--lr-steps", "2"], "drop --lr-steps"),
                        (["--lr-schedule", "poly", "--min-lr", "0.5"], "below --lr"),
                        (["--optimizer", "adamw", "--sampled"], "give --row-lr-mult"),
                        (["--amp", "fp16", "--sampled", "--no-split-backward"],
                         "needs --split-backward")):
        with pytest.raises(ValueError, match=match):
            parse_args(["--train-rec", str(tiny_rec), *argv])
    # --amp alone is bf16 (the older on/off flag), a YAML boolean too
    assert parse_args(["--train-rec", "x", "--amp"]).amp == "bf16"
    assert parse_args(["--train-rec", "x"]).amp == "off"


def _lrs(path):
    with open(path, newline="") as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}


def test_resume_in_the_middle_of_a_poly_schedule_is_exact(tiny_rec, tmp_path):
    """10 steps straight == 5, stop, --resume, 5 more, with the poly schedule over 2 epochs
    (20 steps), a warm-up, fp16 with its loss scaler and clipping: backbone, momentum, rows,
    the scaler's state and every logged LR are the same; the LRs are the closed form's.
    (--no-row-catchup-decay: the rows' lazy every-step decay is written into the stored rows
    at each snapshot, so a resumed run's rows then differ from a straight run's in the last
    float32 bit, whatever the schedule: measured 8.8e-8 at most here. That is the row
    store's, not the schedule's.)"""
    hf = ["--sampled", "--sampler", "exact", "--sample-num", "24", "--interval", "5",
          "--no-background-rebuild", "--recall-every", "0", "--no-row-catchup-decay"]
    recipe = ["--lr-schedule", "poly", "--epochs", "2", "--warmup-steps", "2",
              "--clip-grad-norm", "1"]
    runtime = ["--amp", "fp16", "--threads", "1", "--workers", "0", "--print-freq", "1"]
    out = {n: tmp_path / n for n in ("straight", "split")}
    assert main(["--train-rec", str(tiny_rec), *TINY, *hf, *recipe, *runtime,
                 "--max-steps", "10", "--save-path", str(out["straight"])]) == 0
    assert main(["--train-rec", str(tiny_rec), *TINY, *hf, *recipe, *runtime,
                 "--max-steps", "5", "--save-path", str(out["split"])]) == 0
    assert main(["--resume", str(out["split"]), "--max-steps", "10", *runtime]) == 0
    a, b = (torch.load(out[n] / "last.pth", weights_only=True) for n in ("straight", "split"))
    assert a["step"] == b["step"] == 10
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    ra, rb = (read_snapshot(out[n] / c["ps_snapshot"])[0]["classifier"]
              for n, c in (("straight", a), ("split", b)))
    np.testing.assert_array_equal(ra.weight, rb.weight)
    lrs = _lrs(out["split"] / "metrics.csv")
    assert lrs == _lrs(out["straight"] / "metrics.csv")
    want = LRSchedule("poly", 0.1, total_steps=20, warmup_steps=2)
    assert lrs == {s: pytest.approx(want.lr_at(s - 1), rel=1e-12) for s in range(1, 11)}
    assert lrs[1] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.1 * (1 - 7 / 18) ** 2)


# ---------------------------------------------------------------------------- fp16 + clipping
class Tiny(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 6 * 6, dim))

    def forward(self, x):
        return self.net(x)


def _args(**kw):
    from argparse import Namespace

    base = dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                adam_betas=[0.9, 0.999], amp="fp16", scaler_growth_interval=2000)
    return Namespace(**{**base, **kw})


def _sampled_head(n=20, dim=8):
    store = LocalRowStore(n, dim, SGDConfig(lr=0.5), std=0.1, seed=1)
    sampler = build_sampler("random", n, dim, seed=0)
    head = SampledHead(ThreadedRowStore(store), sampler, sample_num=12)
    head.set_lr(0.5)
    return head, store


@pytest.mark.parametrize("kind", ["full", "sampled"])
def test_fp16_overflow_skips_the_step_and_halves_the_scale(kind):
    """A scale of 2**40 overflows float16 in the backbone's backward: the backbone's (and the
    full head's) step is skipped and the scale halves; the sampled head's rows, pushed from
    the unscaled float32 loss before the overflow, still step. The next step, at a scale
    that fits, trains the backbone."""
    torch.manual_seed(0)
    backbone = Tiny()
    if kind == "full":
        head, store = FullHead(20, 8, logit="linear"), None
    else:
        head, store = _sampled_head()
    args = _args()
    precision = Precision.from_args(args, torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    opt = build_optimizer(args, [backbone, head], torch.device("cpu"))
    step = TrainStep(backbone, head, opt, precision, split=True)
    images, labels = torch.randn(6, 3, 6, 6), torch.arange(6)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head_before = [p.clone() for p in head.parameters()]
    rows_before = store.read_all() if store is not None else None
    out = step(images, labels)
    assert torch.isfinite(out.loss)            # the float32 loss did not overflow ...
    assert precision.scaler.get_scale() == 2.0 ** 39   # ... the scaled gradient did
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]) or "running" in k or "num_batches" in k, k
    for p, q in zip(head.parameters(), head_before):
        assert torch.equal(p, q)               # the full head skipped with the backbone
    if store is not None:
        head.rowstore.wait()
        moved = np.abs(store.read_all() - rows_before).max(axis=1) > 0
        assert moved.sum() == 12               # the 12 selected rows stepped anyway
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    step.precision = precision
    step(images, labels)
    assert precision.scaler.get_scale() == 2.0 ** 8
    assert any(not torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    if store is not None:
        head.rowstore.close()


def test_clip_grad_norm_bounds_the_backbones_total_norm():
    """--clip-grad-norm: at the optimizer's step the backbone's gradients have total norm at
    most the bound (after unscaling, with fp16), where unclipped they were well above it."""
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 6, 6) * 10, torch.arange(6)
    norms = {}
    for amp, clip in (("off", 0.0), ("off", 0.05), ("fp16", 0.05)):
        backbone, head = Tiny(), FullHead(20, 8, logit="linear")
        args = _args(amp=amp)
        precision = Precision.from_args(args, torch.device("cpu"))
        opt = build_optimizer(args, [backbone, head], torch.device("cpu"))
        seen = []
        real_step = opt.step
        opt.step = lambda *a, **k: (seen.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in backbone.parameters()])))),
            real_step(*a, **k))[1]
        TrainStep(backbone, head, opt, precision, split=True, clip_norm=clip)(images, labels)
        norms[(amp, clip)] = seen[0]
    assert norms[("off", 0.0)] > 0.2           # unclipped: 4x the bound and more
    assert norms[("off", 0.05)] <= 0.05 * (1 + 1e-5)
    assert norms[("fp16", 0.05)] <= 0.05 * (1 + 1e-3)
    assert clip_backbone(Tiny(), 0.0) is None  # 0: off
