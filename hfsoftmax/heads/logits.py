"""Logits and margins, in one place for the full and the sampled heads.

Three logit types over a weight matrix ``W`` (rows = classes, the full ``W`` or a sampled
subset ``W_S``):

- ``linear``: ``x W^T (+ b)``, the plain softmax classifier.
- ``cosface`` (Wang et al., CVPR 2018, "CosFace: Large Margin Cosine Loss"):
  ``s * cos(theta_j)`` for every class, ``s * (cos(theta_y) - m)`` for the target.
- ``arcface`` (Deng et al., CVPR 2019, "ArcFace: Additive Angular Margin Loss"):
  ``s * cos(theta_y + m)`` for the target. As in InsightFace's ``arcface_torch``, the margin
  is applied only where ``theta_y + m`` stays below pi (``cos(theta_y) > cos(pi - m)``);
  beyond it the target logit is ``cos(theta_y) - m sin(m)`` so that the logit keeps
  decreasing with theta (monotone), and ``easy_margin`` instead applies the margin only
  where ``cos(theta_y) > 0``.

Features and weights are L2-normalized for the two margin types.

>>> spec = LogitSpec("cosface", s=30.0, m=0.2)
>>> logits = spec(features, weight, target)      # (B, C), target indexes columns of weight
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LOGIT_TYPES", "DEFAULT_MARGINS", "LogitSpec"]

LOGIT_TYPES = ("linear", "cosface", "arcface")
# arcface_torch's defaults (cosface 0.4 there; the CosFace paper uses 0.35).
DEFAULT_MARGINS = {"linear": 0.0, "cosface": 0.35, "arcface": 0.5}
DEFAULT_SCALE = 64.0


@dataclass(frozen=True)
class LogitSpec:
    """Which logits to compute: type, scale ``s`` and margin ``m`` (None: the type's default).

    Calling it gives ``(B, C)`` logits of ``features`` (B, D) against ``weight`` (C, D), with
    the margin applied at column ``target[i]`` of row ``i``.
    """

    logit: str = "linear"
    s: float = DEFAULT_SCALE
    m: float | None = None
    easy_margin: bool = False

    def __post_init__(self) -> None:
        if self.logit not in LOGIT_TYPES:
            raise ValueError(f"unknown logit type {self.logit!r}; valid: {', '.join(LOGIT_TYPES)}")
        if self.m is None:
            object.__setattr__(self, "m", DEFAULT_MARGINS[self.logit])
        for name in ("s", "m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{self.logit} {name} must be a finite number, got {v!r}")
        if self.logit != "linear" and self.s <= 0:
            raise ValueError(f"{self.logit} scale s must be > 0, got {self.s!r}")
        if self.logit == "arcface" and not 0 <= self.m < math.pi / 2:
            raise ValueError(f"arcface margin m must be in [0, pi/2) radians, got {self.m!r}")

    @property
    def normalized(self) -> bool:
        """True for the margin heads (cosine logits)."""
        return self.logit != "linear"

    def __call__(self, features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.with_plain_target(features, weight, target, bias)[0]

    def with_plain_target(self, features: torch.Tensor, weight: torch.Tensor,
                          target: torch.Tensor, bias: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, plain_target)``: the logits, and each row's target logit *without*
        the margin (``s cos(theta_y)``; the linear logit itself), what an honest accuracy
        compares against the other columns (:func:`~hfsoftmax.heads.base.correct_count`)."""
        rows = torch.arange(features.shape[0], device=features.device)
        if self.logit == "linear":
            logits = F.linear(features, weight, bias)
            return logits, logits[rows, target]
        if bias is not None:
            raise ValueError(f"{self.logit} logits take no bias (cosine logits); use bias=False")
        cos = F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))
        cos = cos.clamp(-1.0, 1.0)
        t = cos[rows, target]
        return self.s * cos.index_put((rows, target), self.target_logit(t)), self.s * t

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        """The margin-adjusted cosine of the target class (before the scale)."""
        m = float(self.m)
        if self.logit == "cosface":
            return cos_t - m
        # arcface: cos(theta + m) = cos cos_m - sin sin_m; the clamp keeps sqrt's gradient
        # finite where cos = +-1 exactly.
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(1e-12))
        phi = cos_t * math.cos(m) - sin_t * math.sin(m)
        if self.easy_margin:
            return torch.where(cos_t > 0, phi, cos_t)
        threshold = math.cos(math.pi - m)          # theta + m > pi beyond this
        return torch.where(cos_t > threshold, phi, cos_t - math.sin(math.pi - m) * m)
