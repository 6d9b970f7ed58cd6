"""Honest training metrics: the logged accuracy is the model's, computed without the margin,
over the head's columns (all classes for the full head, the selected ones for a sampled
head, which also logs its top-1 over all classes)."""
from __future__ import annotations

import csv

import pytest
import torch

from hfsoftmax.data.uint8 import collate_uint8
from hfsoftmax.engine.data import ShardedBatchSampler
from hfsoftmax.engine.gpu_data import build_train_images, to_device
from hfsoftmax.engine.config import parse_args
from hfsoftmax.extract import load_backbone
from hfsoftmax.heads import FullHead, HeadOutput, LogitSpec, correct_count
from hfsoftmax.train import main
from paramserver.snapshot import read_snapshot
from tests.train_data import make_tiny_rec

pytestmark = pytest.mark.timeout(300)

TINY = ["--arch", "convnet-s", "--embedding-size", "16", "--batch-size", "16", "--workers",
        "0", "--threads", "1", "--print-freq", "1", "--no-augment", "--weight-decay", "0"]


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    return make_tiny_rec(tmp_path_factory.mktemp("data") / "tiny", num_classes=20,
                         per_class=8, seed=4)


@pytest.mark.parametrize("logit", ["linear", "cosface", "arcface"])
def test_correct_count_is_the_margin_free_argmax(logit):
    torch.manual_seed(0)
    w = torch.randn(30, 8)
    target = torch.randint(0, 30, (64,))
    feats = w[target] + 0.8 * torch.randn(64, 8)  # a model that is right about half the time
    spec = LogitSpec(logit, s=16.0, m=0.0 if logit == "linear" else 0.4)
    logits, plain = spec.with_plain_target(feats, w, target)
    free = LogitSpec(logit, s=16.0, m=0.0)(feats, w, target)  # the same scores, no margin
    naive = int((free.argmax(1) == target).sum())
    assert int(correct_count(HeadOutput(None, logits, target, plain))) == naive
    if logit != "linear":  # the margin's argmax is not the model's accuracy
        assert int((logits.argmax(1) == target).sum()) < naive


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("head,sampled", [("cosface", False), ("arcface", False),
                                          ("cosface", True)])
def test_logged_accuracy_is_the_models_top1_without_margin(head, sampled, tiny_rec,
                                                           tmp_path):
    """Train 20 steps, then one more step at LR ~0 (the model does not move): the accuracy
    logged for that step equals the top-1 of the checkpoint's model on that step's batch,
    computed directly from its features and rows without the margin. The sampled head
    selects all 20 classes here, so its columns are every class."""
    hf = ["--sampled", "--sampler", "exact", "--sample-num", "20", "--recall-every", "1",
          "--no-background-rebuild"] if sampled else []
    base = ["--train-rec", tiny_rec, *TINY, "--head", head, "--scale", "16", "--margin",
            "0.3", *hf]
    save = tmp_path / "run"
    assert main([*base, "--max-steps", "20", "--save-path", str(save)]) == 0
    assert main(["--resume", str(save), "--max-steps", "21", "--lr", "1e-12", "--threads",
                 "1", "--workers", "0", "--print-freq", "1"]) == 0
    logged = _rows(save / "metrics.csv")[-1]
    assert int(logged["step"]) == 21
    # the batch of step 21 (epoch 2, batch 1: 160 images / 16 = 10 steps an epoch)
    args = parse_args([*base, "--save-path", str(tmp_path / "x")])
    ds = build_train_images(args)  # the trainer's own data path
    batches = ShardedBatchSampler(len(ds), 16, 0, 1, seed=0, flip=False)
    batches.set_epoch(2, 0)
    batch = next(iter(batches))
    images, labels = to_device(collate_uint8([ds[i] for i in batch]), torch.device("cpu"))
    backbone = load_backbone(str(save / "last.pth"), device="cpu").train()  # BN: batch stats
    ckpt = torch.load(save / "last.pth", weights_only=True)
    if sampled:
        rows = torch.from_numpy(read_snapshot(save / ckpt["ps_snapshot"])[0]["classifier"]
                                .weight)
    else:
        rows = ckpt["head"]["weight"]
    with torch.no_grad():
        feats = backbone(images)
        cos = torch.nn.functional.normalize(feats, dim=1) @ \
            torch.nn.functional.normalize(rows, dim=1).T
    want = float((cos.argmax(1) == labels).float().mean())
    assert float(logged["acc"]) == pytest.approx(want, abs=1e-6), (logged, want)
    assert want > 0.3  # a model that learns logs an accuracy that shows it
    if sampled:  # and its top-1 over all classes, from the recall telemetry
        assert float(logged["top1_all"]) == pytest.approx(want, abs=1e-6)
    line = next(ln for ln in (save / "train.log").read_text().splitlines()
                if "step 21/21" in ln)
    assert (" acc(sampled) " in line and " top1(all) " in line) if sampled else \
        (" acc " in line and "top1(all)" not in line), line
