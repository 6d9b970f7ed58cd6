"""The learning-rate schedule: linear warm-up, then step decay at given epochs.

A pure function of the step (no hidden counters), so a resumed run recomputes the same LR
and the state saved in checkpoints is only the schedule's settings.

>>> sched = StepSchedule(base_lr=0.1, milestones=[1000, 1500], gamma=0.1, warmup_steps=100)
>>> sched.lr_at(50), sched.lr_at(1200)
(0.05, 0.010000000000000002)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["StepSchedule"]


@dataclass
class StepSchedule:
    """``base_lr * gamma ** (milestones passed)``, scaled by ``(step + 1) / warmup_steps``
    during warm-up. ``milestones`` are steps (the trainer converts ``--lr-steps`` epochs)."""

    base_lr: float
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_steps: int = 0

    def lr_at(self, step: int) -> float:
        """The learning rate of the 0-based ``step``."""
        lr = self.base_lr * self.gamma ** sum(step >= m for m in self.milestones)
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def state_dict(self) -> dict:
        """Plain settings (what checkpoints store under ``lr_scheduler``)."""
        return asdict(self)

    @classmethod
    def from_epochs(cls, base_lr: float, lr_steps: list[float], steps_per_epoch: int,
                    gamma: float, warmup_steps: int = 0) -> "StepSchedule":
        """Milestones given in (possibly fractional) epochs."""
        return cls(base_lr, [int(round(e * steps_per_epoch)) for e in lr_steps], gamma,
                   warmup_steps)
