"""Mixed precision as GPT-NeoX configs declare it: fp32, bf16, or fp16 with loss scaling.

Parameters and optimizer state stay fp32 (the "master weights"); bf16/fp16 apply to the forward and
backward computation through ``torch.autocast``. fp16 needs loss scaling; ``LossScaler`` follows
DeepSpeed's DynamicLossScaler, which GPT-NeoX's ``fp16`` block configures: start at
``2**initial_scale_power``, halve on overflow once ``hysteresis`` overflows accumulated, double after
``loss_scale_window`` clean steps, never below ``min_loss_scale``. A non-zero ``loss_scale`` is static.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from neoxt.config.schema import TrainingConfig
from neoxt.dtypes import dtype_of


def compute_dtype(precision: str) -> torch.dtype:
    return dtype_of(precision)


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The forward-pass context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype_of(precision))


@dataclass
class LossScaler:
    """Dynamic (or static) loss scale for fp16; scale 1 and never-overflowing for fp32/bf16."""

    scale: float = 1.0
    dynamic: bool = False
    window: int = 1000
    min_scale: float = 1.0
    hysteresis: int = 2
    good_steps: int = 0
    hysteresis_left: int = 2

    @classmethod
    def from_config(cls, cfg: TrainingConfig) -> LossScaler:
        if cfg.precision != "fp16":
            return cls()
        if cfg.loss_scale:
            return cls(scale=float(cfg.loss_scale), dynamic=False)
        return cls(
            scale=float(2**cfg.initial_scale_power),
            dynamic=True,
            window=cfg.loss_scale_window,
            min_scale=float(cfg.min_loss_scale),
            hysteresis=cfg.hysteresis,
            hysteresis_left=cfg.hysteresis,
        )

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.good_steps = 0
            if self.hysteresis_left <= 1:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self.hysteresis_left = self.hysteresis
            else:
                self.hysteresis_left -= 1
            return
        self.good_steps += 1
        if self.good_steps % self.window == 0:
            self.scale *= 2.0
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.scale = float(sd["scale"])
        self.good_steps = int(sd["good_steps"])
        self.hysteresis_left = int(sd["hysteresis_left"])
