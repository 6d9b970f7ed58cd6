"""The GPU recipe on a GPU (marker ``gpu``: skipped, loudly, where CUDA is absent; NOT RUN
by this project yet, which has had no GPU): the trainer's fp16/bf16 runs, the loss scaler's
skipped step, the split backward against the fused one, and the host synchronisations of an
unlogged step seen by CUDA's own sync debug mode.

    pytest -m gpu tests/test_gpu_recipe.py
"""
from __future__ import annotations

import warnings

import pytest
import torch

from hfsoftmax.train import main
from tests.test_sync_count import TINY as SYNC_TINY

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

TINY = ["--arch", "convnet-s", "--embedding-size", "32", "--batch-size", "16", "--workers",
        "2", "--print-freq", "2", "--head", "cosface", "--scale", "16", "--margin", "0.1",
        "--device", "cuda", "--max-steps", "6"]
HF = ["--sampled", "--sampler", "exact", "--sample-num", "24", "--interval", "3",
      "--no-background-rebuild"]


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
@pytest.mark.parametrize("sampled", [False, True])
def test_the_trainer_runs_on_a_gpu(amp, sampled, tiny_rec, tmp_path):
    if amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        with pytest.raises(ValueError, match="no native bfloat16"):
            from hfsoftmax.engine.config import parse_args
            from hfsoftmax.train import run
            run(parse_args(["--train-rec", tiny_rec, *TINY, "--amp", "bf16",
                            "--save-path", str(tmp_path / "x")]))
        return
    save = tmp_path / "run"
    assert main(["--train-rec", tiny_rec, *TINY, *(HF if sampled else []), "--amp", amp,
                 "--channels-last", "--clip-grad-norm", "5", "--lr-schedule", "poly",
                 "--save-path", str(save)]) == 0
    ckpt = torch.load(save / "last.pth", weights_only=True)
    assert ckpt["step"] == 6 and (ckpt["scaler"] is not None) == (amp == "fp16")


def _one_step_sync_warnings(argv) -> int:
    """CUDA's sync debug mode's warnings during the second of two unlogged steps."""
    from hfsoftmax.data.uint8 import collate_uint8
    from hfsoftmax.engine.config import parse_args
    from hfsoftmax.engine.gpu_data import build_train_images, to_device
    from hfsoftmax.engine.model import prepare_head
    from hfsoftmax.engine.optim import Precision, build_optimizer
    from hfsoftmax.engine.step import StepCounters, TrainStep
    from hfsoftmax.heads.base import correct_count
    from hfsoftmax.heads.factory import build_head_from_args
    from hfsoftmax.heads.sampled_config import rule_from_args
    from hfsoftmax.models import build_backbone
    from hfsoftmax.train import _close_head

    args = parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    images = build_train_images(args)
    batch = tuple(t.pin_memory() for t in
                  collate_uint8([images[(i, i % 2 == 0)] for i in range(16)]))
    backbone = build_backbone(args.arch, args.embedding_size).to(device)
    head, store = build_head_from_args(args, 40, rule_from_args(args) if args.sampled else None)
    head, store = prepare_head(args, head, store, device)
    try:
        opt = build_optimizer(args, [backbone, head], device)
        step = TrainStep(backbone, head, opt, Precision.from_args(args, device), split=True)
        counters = StepCounters(device)
        count = 0
        for i in range(2):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    x, y = to_device(batch, device)
                    out = step(x, y)
                    counters.add(out.loss, correct_count(out), y.shape[0], i)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            count = sum("synchroniz" in str(w.message) for w in caught)
        counters.read(0)
        return count
    finally:
        _close_head(head, store)


def test_cuda_sees_the_syncs_counted_on_the_cpu(tiny_rec):
    """tests/test_sync_count.py on the device itself: the full head's unlogged step does
    not synchronise; the sampled head's does once (its features to the host)."""
    argv = ["--train-rec", tiny_rec, *SYNC_TINY, "--device", "cuda"]
    assert _one_step_sync_warnings(argv) == 0
    sampled = _one_step_sync_warnings([*argv, "--sampled", "--sampler", "exact",
                                       "--sample-num", "24", "--recall-every", "0"])
    assert 1 <= sampled <= 2, sampled


def test_split_equals_fused_on_a_gpu(tiny_rec, tmp_path):
    """Bit for bit on the CPU (tests/test_split_step.py); on a GPU to float round-off
    (cuDNN picks kernels per run)."""
    runs = {}
    for split in ("--split-backward", "--no-split-backward"):
        save = tmp_path / split
        assert main(["--train-rec", tiny_rec, *TINY, *HF, split, "--no-cudnn-benchmark",
                     "--save-path", str(save)]) == 0
        runs[split] = torch.load(save / "last.pth", weights_only=True)["model"]
    for k, v in runs["--split-backward"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, runs["--no-split-backward"][k], rtol=1e-4,
                                       atol=1e-5, msg=k)
