"""Learning-rate schedules: linear warm-up, then step decay, polynomial decay or a cosine.

Every schedule is a pure function of the step (no hidden counters), so a resumed run
recomputes the same LR and the state saved in checkpoints is only the schedule's settings.
The poly and cosine schedules run from the warm-up's end to ``total_steps`` (the trainer's
``--epochs`` x steps per epoch: ``--max-steps`` stops a run early without reshaping its
schedule, so a run stopped and resumed follows the same curve). arcface_torch's recipe is
``poly`` with power 2.

>>> sched = StepSchedule(base_lr=0.1, milestones=[1000, 1500], gamma=0.1, warmup_steps=100)
>>> sched.lr_at(50), sched.lr_at(1200)
(0.05, 0.010000000000000002)
>>> LRSchedule("poly", 0.1, total_steps=1000, power=2.0).lr_at(500)
0.025
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["StepSchedule", "LRSchedule", "KINDS", "schedule_from_args"]

KINDS = ("step", "poly", "cosine")


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


@dataclass
class LRSchedule:
    """One of :data:`KINDS` after a linear warm-up of ``warmup_steps``:

    * warm-up (``step < warmup_steps``): ``base_lr * (step + 1) / warmup_steps`` (times the
      step schedule's factor for ``step``);
    * ``step``: ``base_lr * gamma ** (milestones passed)``;
    * ``poly``: ``min_lr + (base_lr - min_lr) * (1 - t) ** power``;
    * ``cosine``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2``;

    with ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1].
    """

    kind: str
    base_lr: float
    total_steps: int = 0
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    power: float = 2.0
    min_lr: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown LR schedule {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.kind != "step" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"the {self.kind} schedule needs more steps ({self.total_steps}) "
                             f"than its warm-up ({self.warmup_steps}); raise --epochs or "
                             "shorten the warm-up")

    def lr_at(self, step: int) -> float:
        """The learning rate of the 0-based ``step``."""
        if self.kind == "step":
            lr = self.base_lr * self.gamma ** sum(step >= m for m in self.milestones)
        else:
            t = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
            t = min(max(t, 0.0), 1.0)
            decay = (1.0 - t) ** self.power if self.kind == "poly" else \
                0.5 * (1.0 + math.cos(math.pi * t))
            lr = self.min_lr + (self.base_lr - self.min_lr) * decay
        if step < self.warmup_steps:
            lr = (self.base_lr if self.kind != "step" else lr) * (step + 1) / self.warmup_steps
        return lr

    def state_dict(self) -> dict:
        """Plain settings (what checkpoints store under ``lr_scheduler``)."""
        return asdict(self)


def schedule_from_args(args, steps_per_epoch: int) -> LRSchedule:
    """The trainer's schedule: ``--lr-schedule`` from ``--lr``, over ``--epochs`` epochs,
    warm-up ``--warmup-steps`` or ``--warmup-epochs``, milestones ``--lr-steps`` (epochs)."""
    warmup = args.warmup_steps or int(round(args.warmup_epochs * steps_per_epoch))
    return LRSchedule(args.lr_schedule, args.lr, total_steps=args.epochs * steps_per_epoch,
                      warmup_steps=warmup,
                      milestones=[int(round(e * steps_per_epoch)) for e in args.lr_steps],
                      gamma=args.gamma, power=args.lr_power, min_lr=args.min_lr)
