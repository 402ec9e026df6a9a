"""A toy objective registered from outside ``src/`` (acceptance: new objectives need no change there).

``train_impl: toy_token`` raises the probability of one token (``TARGET``) at every position: loss =
mean over the global batch's positions of ``-log p(TARGET)``. It also keeps state of its own (how
many batches it has trained on, and a private random generator it draws a per-step weight from),
which must survive a checkpoint and resume exactly, and reports extra metrics.

Imported in-process by the tests, and by ``neoxt train`` through ``NEOXT_PLUGINS=toy_objective``.
"""

from __future__ import annotations

import torch

from neoxt.distributed.mesh import all_reduce_sum
from neoxt.train.objectives import (
    ObjectiveContext,
    StepOutcome,
    accumulate,
    forward_logits,
    register_objective,
)

TARGET = 5


class ToyTokenObjective:
    def __init__(self, ctx: ObjectiveContext):
        self.model = ctx.parallelize(ctx.model)
        self.parts = [self.model]
        self.precision, self.group = ctx.cfg.training.precision, ctx.group
        self.batches = 0
        self.rng = torch.Generator().manual_seed(1234)  # sampling state of the objective's own

    def _loss(self, micro, loss_scale: float, backward: bool, weight: float) -> torch.Tensor:
        positions = all_reduce_sum(torch.tensor(float(sum(b["tokens"].numel() for b in micro)),
                                                dtype=torch.float64), self.group)

        def micro_loss(b):
            logp = torch.log_softmax(forward_logits(self.model, b, self.precision).float(), dim=-1)
            return -weight * logp[..., TARGET].sum() / positions.float()

        return all_reduce_sum(accumulate(micro, micro_loss, loss_scale, backward), self.group)

    def train_batch(self, micro, loss_scale: float) -> StepOutcome:
        self.batches += 1
        weight = 0.5 + float(torch.rand((), generator=self.rng))
        loss = self._loss(micro, loss_scale, True, weight)
        metrics = {"toy_batches": float(self.batches), "toy_weight": weight, "target_nll": loss.item() / weight}
        return StepOutcome(loss=loss, metrics=metrics)

    def eval_batch(self, micro) -> StepOutcome:
        return StepOutcome(loss=self._loss(micro, 1.0, False, 1.0))

    def state_dict(self) -> dict:
        return {"batches": self.batches, "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        self.rng.set_state(state["rng"])


register_objective("toy_token", ToyTokenObjective)
