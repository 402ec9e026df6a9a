"""One optimizer step around an objective: gradients, unscale, clip, finite check, update.

The objective (``neoxt.train.objectives``) leaves the loss-scaled gradients of one global batch;
everything after that is here, the same for every objective: divide by the fp16 loss scale, clip
the global gradient norm (sharded parameters through ``neoxt.distributed.parallelize``), decide what
a non-finite loss or norm means, step or skip the optimizers, and update the loss scaler.

The NaN / fp16-overflow policy and its counters live only here (``StepCounters`` is what checkpoints
save and ``neoxt status`` reports):

- fp16 with a dynamic scale, finite loss, non-finite norm: an **overflow**. The update is skipped
  and the scale shrinks; it is not a NaN.
- otherwise a non-finite loss or norm is a **NaN**: ``on_nan: skip`` skips the update (and counts
  it), and gives up after ``max_consecutive_nan`` NaN steps in a row (the run is diverging); ``on_nan: stop`` leaves weights and optimizer untouched and reports ``stop`` so the loop
  saves the last good state and raises ``TrainingStopped``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neoxt.config.schema import RunConfig
from neoxt.errors import NeoxtError
from neoxt.train.objectives import Objective
from neoxt.train.optim import set_lr
from neoxt.train.precision import LossScaler


class TrainingStopped(NeoxtError):
    """Training stopped on purpose with an error status (on_nan: stop); the last good state is saved."""


@dataclass
class StepCounters:
    """NaN steps and skipped updates (NaN or fp16 overflow) so far; saved in checkpoints."""

    nan_count: int = 0
    skipped_count: int = 0
    consecutive_nan: int = 0  # the current NaN streak; not checkpointed (a resumed run starts a new one)

    def state_dict(self) -> dict[str, int]:
        return {"nan_count": self.nan_count, "skipped_count": self.skipped_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nan_count = int(state.get("nan_count", 0))
        self.skipped_count = int(state.get("skipped_count", 0))


@dataclass
class StepResult:
    loss: float  # the objective's loss (may be non-finite)
    grad_norm: float
    nan: bool = False
    overflow: bool = False
    stop: bool = False  # on_nan: stop hit: nothing was updated, the loop saves and raises
    give_up: int = 0  # on_nan: skip hit max_consecutive_nan: this many NaN steps in a row; the loop raises
    advance: bool = True
    metrics: dict[str, float] = field(default_factory=dict)
    in_loss: bool = True  # the objective's StepOutcome.in_loss

    @property
    def skipped(self) -> bool:
        return self.nan or self.overflow

    def describe_stop(self) -> str:
        return "loss" if not math.isfinite(self.loss) else "gradient norm"


def unscale_gradients(parts: list[nn.Module], loss_scale: float) -> None:
    """Divide the accumulated gradients by the fp16 loss scale (a no-op at scale 1)."""
    if loss_scale == 1.0:
        return
    grads = [p.grad for part in parts for p in part.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, 1.0 / loss_scale)


def is_sharded(parts: list[nn.Module]) -> bool:
    """Whether FSDP2/TP parallelized ``parts`` (DTensor parameters): they reduce their own gradients
    and need the collective gradient norm."""
    return any(type(p).__name__ == "DTensor" for part in parts for p in part.parameters())


def gradient_clipper(parts: list[nn.Module], clip: float | None, pp_mesh: Any = None) -> Callable[[], float]:
    """Clip the global gradient norm of ``parts`` to ``clip`` (none when unset/0); returns the norm.

    Sharded (DTensor) or pipelined parameters need the collective norm of ``neoxt.distributed``."""
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    max_norm = clip if clip and clip > 0 else float("inf")
    if pp_mesh is not None or is_sharded(parts):
        from neoxt.distributed.parallelize import clip_grad_norm_

        return lambda: float(clip_grad_norm_(params, max_norm, pp_mesh=pp_mesh))
    return lambda: float(torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, foreach=True))


class Stepper:
    """Runs ``objective.train_batch`` and everything after it (see the module docstring)."""

    def __init__(self, objective: Objective, optimizers: list[torch.optim.Optimizer], scaler: LossScaler,
                 cfg: RunConfig, counters: StepCounters, clip: Callable[[], float]):
        self.objective, self.optimizers, self.scaler, self.counters = objective, optimizers, scaler, counters
        self.clip = clip
        self.on_nan = cfg.training.on_nan
        self.max_consecutive_nan = cfg.training.max_consecutive_nan
        self.fp16_dynamic = cfg.training.precision == "fp16" and scaler.dynamic

    def step(self, micro: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)
        outcome = self.objective.train_batch(micro, self.scaler.scale)
        unscale_gradients(self.objective.parts, self.scaler.scale)
        grad_norm = self.clip()
        loss = outcome.loss.item()
        loss_ok, norm_ok = math.isfinite(loss), math.isfinite(grad_norm)
        overflow = self.fp16_dynamic and loss_ok and not norm_ok
        nan = not loss_ok or (not norm_ok and not overflow)
        result = StepResult(loss, grad_norm, nan, overflow, advance=outcome.advance, metrics=outcome.metrics,
                            in_loss=outcome.in_loss)
        if outcome.lr_scale != 1.0:
            for optimizer in self.optimizers:
                set_lr(optimizer, lr * outcome.lr_scale)
        for optimizer in self.optimizers:
            if not (nan or overflow):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if nan:
            self.counters.nan_count += 1
        streak = self.counters.consecutive_nan = self.counters.consecutive_nan + 1 if nan else 0
        if nan and self.on_nan == "skip" and streak >= self.max_consecutive_nan:
            result.give_up = streak
        if nan and self.on_nan == "stop":
            result.stop = True  # the scaler and skip count stay as they were: this step never happened
            return result
        self.scaler.update(overflow)
        if result.skipped:
            self.counters.skipped_count += 1
        return result
