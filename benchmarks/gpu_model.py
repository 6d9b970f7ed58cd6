"""Stated figures of an H100-class GPU, and the cost model the projections build on them.

This project's machine has no GPU, so ``step_breakdown.py`` and ``device_select.py``
project the GPU's share of a step from these assumptions (every one is printed with the
result; override them on the command line). On a GPU the scripts measure instead.

The figures (H100 SXM 80 GB; the issue's target "one H100-class GPU"):

* ``backbone_ms`` 120: ir50 at batch 256, 112x112, forward + backward + SGD in mixed
  precision: the issue's "~120 ms of GPU work" (about 2,100 images/s; ir50 is ~6.3 GFLOP
  forward a face, so ~4.8 TFLOP a step at ~40 TFLOP/s, typical for convolutions at this
  batch). ``forward_share`` 1/3: backward costs about twice the forward.
* ``matmul_tflops`` 400: sustained dense float16/bfloat16 tensor-core rate for the thin
  (256 x 512) x (512 x N) products of selection (peak 989; 40% assumed).
* ``hbm_gbs`` 2,500: sustained HBM3 bandwidth (peak 3,350).
* ``pinned_gbs`` 25 and ``pageable_gbs`` 8: host<->device copies from pinned memory (PCIe
  Gen5 x16, peak 64) and from pageable memory (staged through a driver buffer; the host
  blocks until done).
* ``sync_ms`` 0.05: what one host-device synchronisation costs beyond the host work it
  exposes (the GPU idles until the host queues work again).
* ``topk_passes`` 4: passes of ``torch.topk``'s radix select over the float32 scores.
* ``launch_ms`` 0.2: kernel-launch latency of the head (about 20 small kernels).
"""
from __future__ import annotations

ASSUMED = {
    "gpu": "H100 SXM class (assumed figures, not measured here)",
    "backbone_ms": 120.0,
    "forward_share": 1 / 3,
    "matmul_tflops": 400.0,
    "hbm_gbs": 2500.0,
    "pinned_gbs": 25.0,
    "pageable_gbs": 8.0,
    "sync_ms": 0.05,
    "topk_passes": 4,
    "launch_ms": 0.2,
}


def copy_ms(nbytes: float, pinned: bool, a: dict = ASSUMED) -> float:
    """A host<->device copy of ``nbytes``."""
    return 1e3 * nbytes / ((a["pinned_gbs"] if pinned else a["pageable_gbs"]) * 1e9)


def select_ms(num_classes: int, dim: int, batch: int, itemsize: int = 2,
              a: dict = ASSUMED) -> float:
    """The device sampler's GPU work for one batch: the (B, D) x (D, N) product (bound by
    the tensor cores or by reading the rows, whichever is slower), writing the float32
    scores and ``topk_passes`` reads of them by the top-k."""
    flops = 2.0 * batch * num_classes * dim
    rows_bytes = num_classes * dim * itemsize
    scores_bytes = 4.0 * batch * num_classes
    t_mm = max(flops / (a["matmul_tflops"] * 1e12), rows_bytes / (a["hbm_gbs"] * 1e9))
    t_scores = scores_bytes * (1 + a["topk_passes"]) / (a["hbm_gbs"] * 1e9)
    return 1e3 * (t_mm + t_scores)


def head_ms(batch: int, sample_num: int, dim: int, a: dict = ASSUMED) -> float:
    """The sampled head on the GPU: logits, cross-entropy and their backward (three
    (B, D) x (D, S)-sized products, float32 at half the tensor-core rate) plus launches."""
    flops = 3 * 2.0 * batch * sample_num * dim
    return 1e3 * flops / (a["matmul_tflops"] / 2 * 1e12) + a["launch_ms"]


def note_ms(sample_num: int, dim: int, a: dict = ASSUMED) -> float:
    """The device sampler's per-step note: the pushed rows' new values to the device
    (pinned) and written into the copy."""
    nbytes = sample_num * dim * 4
    return copy_ms(nbytes, True, a) + 1e3 * 3 * nbytes / (a["hbm_gbs"] * 1e9)
