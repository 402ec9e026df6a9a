"""GPT-NeoX learning-rate schedules (megatron/learning_rates.py AnnealingLR), as a pure function.

The learning rate of a step depends only on the number of completed steps, so the schedule needs no
state of its own: resuming at iteration N gives exactly the rate the uninterrupted run used. The
checkpoint still records the schedule parameters so a resumed run can tell when they changed.

Upstream semantics kept: warmup is ``lr * max(1, it) / warmup_iters`` for ``it <= warmup_iters``
(``warmup_iters`` may be fractional: upstream's ``warmup`` fraction times the decay iterations);
"linear" decays towards 0 and is floored at ``min_lr``; "cosine" goes from ``lr`` to ``min_lr``;
"exponential" halves every ``decay_iters - warmup`` steps; the result is never below ``min_lr``.
Two deliberate differences: past ``lr_decay_iters`` the rate stays at its end value (upstream's
cosine would rise again), and warmup never exceeds ``lr``: with ``warmup_iters`` below 1 (the
default ``warmup: 0.01`` of a run under 100 steps) upstream's first step runs at
``lr / warmup_iters``, e.g. 12.5·lr for 8 steps; here it runs at ``lr``. From ``warmup_iters`` 1
up the two agree at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from neoxt.config.schema import ScheduleConfig


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    decay_style: str
    decay_iters: int
    warmup_iters: float
    min_lr: float

    def lr_at(self, iteration: int) -> float:
        """Learning rate for the step that starts after ``iteration`` completed steps."""
        it = float(iteration)
        if self.warmup_iters > 0 and it <= self.warmup_iters:
            return self.lr * min(1.0, max(1.0, it) / self.warmup_iters)
        it = min(it, float(self.decay_iters))
        done = it - self.warmup_iters
        span = max(float(self.decay_iters) - self.warmup_iters, 1e-12)
        if self.decay_style == "linear":
            lr = self.lr * (span - done) / span
        elif self.decay_style == "cosine":
            lr = self.min_lr + (self.lr - self.min_lr) / 2.0 * (math.cos(math.pi * done / span) + 1.0)
        elif self.decay_style == "exponential":
            lr = self.lr * math.exp(-0.693 * done / span)
        else:
            lr = self.lr
        return max(lr, self.min_lr)

    def state_dict(self, iteration: int) -> dict[str, Any]:
        """The schedule as GPT-NeoX's AnnealingLR.state_dict() names it (for inspection and checks)."""
        return {
            "start_lr": self.lr,
            "warmup_iter": self.warmup_iters,
            "num_iters": int(iteration),
            "decay_style": self.decay_style,
            "end_iter": self.decay_iters,
            "min_lr": self.min_lr,
        }


def build_schedule(cfg: ScheduleConfig, lr: float, train_iters: int) -> LRSchedule:
    """``lr_decay_iters`` of 0 means ``train_iters`` (GPT-NeoX default); at least 1."""
    decay_iters = max(1, cfg.lr_decay_iters or train_iters)
    return LRSchedule(
        lr=float(lr),
        decay_style=cfg.lr_decay_style,
        decay_iters=int(decay_iters),
        warmup_iters=float(cfg.warmup_iters),
        min_lr=float(cfg.min_lr),
    )
