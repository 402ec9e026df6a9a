"""The language-model objective (``train_impl: normal``): pretraining, and SFT with label files.

The loss is the mean token cross-entropy over every counted token of the global batch (all
micro-batches, all data-parallel ranks). The counted tokens are summed first and each micro-batch's
*summed* loss is divided by that global count, so the gradient does not depend on the accumulation
split or the data-parallel size, and a micro-batch with no counted token (an SFT window that is all
prompt) adds exactly zero loss and zero gradient instead of 0/0.

With several data-parallel ranks the model is parallelized with FSDP2, which sums the ranks'
gradients; only token counts and loss shares are reduced here.

MoE models: each micro-batch's weighted auxiliary loss (``model.aux_loss()``: load balancing and
router z-loss times their coefficients) joins the backward divided by micro-batches x data-parallel
ranks (a mean over them, as the LM loss); the reported loss stays the LM loss, and the unweighted
losses go to the log as ``moe_aux_loss`` / ``moe_z_loss`` (``StepOutcome.metrics``, this rank's
mean over its micro-batches). ``moe_aux_term`` (``objectives.base``) does this for DPO and KTO too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neoxt.distributed.mesh import all_reduce_sum
from neoxt.train.losses import token_mask
from neoxt.train.objectives.base import (
    ObjectiveContext,
    Stateless,
    StepOutcome,
    accumulate,
    loss_chunk_size,
    moe_aux_term,
    token_loss_sum,
)


def counted_tokens(micro: list[dict[str, torch.Tensor]], group: Any = None) -> torch.Tensor:
    """Loss-bearing tokens of the global batch (float64; summed over the data-parallel ``group``)."""
    counted = torch.zeros((), dtype=torch.float64, device=micro[0]["tokens"].device)
    for b in micro:
        counted += token_mask(b["labels"], b.get("loss_mask")).sum()
    return all_reduce_sum(counted, group)


def accumulate_gradients(
    model: nn.Module,
    micro: list[dict[str, torch.Tensor]],
    precision: str = "fp32",
    loss_scale: float = 1.0,
    z_loss: float = 0.0,
    group: Any = None,
    backward: bool = True,
    aux: dict[str, float] | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Backward over one global batch; returns its loss (mean over every counted token, float64).

    ``.grad`` receives the gradient of that mean (plus the MoE auxiliary losses' share, see the module
    docstring) times ``loss_scale`` (``neoxt.train.step`` unscales). ``aux`` (when given) receives this
    rank's unweighted MoE auxiliary losses. ``chunk`` > 0 projects and takes the loss in chunks of that
    many tokens (no full logits).
    """
    denom = counted_tokens(micro, group).clamp(min=1.0)

    def micro_loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum = token_loss_sum(model, b, precision, z_loss, chunk)
        return loss_sum / denom.to(loss_sum.dtype)

    moe = moe_aux_term(model, len(micro), group, aux) if backward else None
    return all_reduce_sum(accumulate(micro, micro_loss, loss_scale, backward, moe), group)


class LMObjective(Stateless):
    """Token cross-entropy (+ optional ``z_loss``) over one model; no state of its own."""

    def __init__(self, ctx: ObjectiveContext):
        self.model = ctx.parallelize(ctx.model)
        self.parts = [self.model]
        self.precision = ctx.cfg.training.precision
        self.z_loss = ctx.cfg.training.z_loss
        self.group = ctx.group
        self.chunk = loss_chunk_size(ctx.cfg)

    def train_batch(self, micro: list[dict[str, torch.Tensor]], loss_scale: float) -> StepOutcome:
        aux: dict[str, float] = {}  # MoE auxiliary losses for the log (empty for dense models)
        loss = accumulate_gradients(self.model, micro, self.precision, loss_scale, self.z_loss, self.group, aux=aux,
                                    chunk=self.chunk)
        return StepOutcome(loss=loss, metrics=aux)

    def eval_batch(self, micro: list[dict[str, torch.Tensor]]) -> StepOutcome:
        count = counted_tokens(micro, self.group)
        # z_loss is a training regulariser: validation reports the plain cross-entropy.
        loss = accumulate_gradients(self.model, micro, self.precision, 1.0, 0.0, self.group, backward=False,
                                    chunk=self.chunk)
        return StepOutcome(loss=loss, tokens=int(count.item()), weight=float(count.item()))
