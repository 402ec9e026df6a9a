"""DPO on preference pairs (GPT-NeoX ``train_impl: dpo``, after upstream's training.py).

Per sequence, the summed log-probability of the counted tokens under the policy and under a frozen
reference; loss ``-logsigmoid(dpo_beta * ((pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)))``,
averaged over the pairs of the global batch (so gradient accumulation does not change it). A batch
holds the chosen rows then the rejected rows. ``dpo_reference_free`` uses 0 for the reference terms;
precomputed reference log-probs (``precompute_model_name``) come with the batch as ``ref``.
Log-probabilities are always taken in fp32 (upstream's ``dpo_fp32`` default; false is accepted).
MoE policies add their routers' auxiliary losses to the backward as the LM objective does, never the
reference's (``objectives/base.moe_aux_term`` says how); the reported loss stays the DPO loss.
"""

from __future__ import annotations

import torch
from torch import nn

from neoxt.distributed.mesh import all_reduce_sum
from neoxt.errors import ConfigError
from neoxt.train.losses import dpo_loss, token_mask
from neoxt.train.objectives.base import (
    ObjectiveContext,
    Stateless,
    StepOutcome,
    accumulate,
    loss_chunk_size,
    moe_aux_term,
    token_logprobs,
)
from neoxt.train.objectives.lm import counted_tokens
from neoxt.train.objectives.reference import frozen_reference


class DPOObjective(Stateless):
    """The reference is rebuilt from ``load`` on resume (see ``frozen_reference``): no extra state."""

    def __init__(self, ctx: ObjectiveContext):
        t = ctx.cfg.training
        if ctx.cfg.data.dataset_impl != "pairwise":
            raise ConfigError("train_impl: dpo needs dataset_impl: pairwise (pos_/neg_train_data_paths)")
        self.reference_free = t.dpo_reference_free
        self.reference = frozen_reference(ctx, not t.precompute_model_name and not t.dpo_reference_free)
        self.model = ctx.parallelize(ctx.model)
        self.parts = [self.model]
        self.beta, self.precision, self.group = t.dpo_beta, t.precision, ctx.group
        self.chunk = loss_chunk_size(ctx.cfg)

    def _logps(self, model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logp = token_logprobs(model, b, self.precision, self.chunk).sum(-1)
        return logp.chunk(2)

    def _reference(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_free:
            zero = torch.zeros(b["tokens"].shape[0] // 2, device=b["tokens"].device)
            return zero, zero
        if "ref" in b:
            mask = token_mask(b["labels"], b.get("loss_mask"))
            per_seq = torch.where(mask, b["ref"].float(), torch.zeros_like(b["ref"].float())).sum(-1)
            return per_seq.chunk(2)
        assert self.reference is not None
        with torch.no_grad():
            return self._logps(self.reference, b)

    def _loss(
        self, micro: list[dict[str, torch.Tensor]], loss_scale: float, backward: bool, aux: dict[str, float] | None = None
    ) -> torch.Tensor:
        pairs = torch.zeros((), dtype=torch.float64, device=micro[0]["tokens"].device)
        for b in micro:
            if b["tokens"].shape[0] % 2:
                raise ConfigError("train_impl: dpo needs preference batches (dataset_impl: pairwise)")
            pairs += b["tokens"].shape[0] // 2
        all_reduce_sum(pairs, self.group)

        def micro_loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
            ref_c, ref_r = self._reference(b)  # first: the MoE aux term reads the last forward, the policy's
            pi_c, pi_r = self._logps(self.model, b)
            return dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta).sum() / pairs.float()

        moe = moe_aux_term(self.model, len(micro), self.group, aux) if backward else None
        return all_reduce_sum(accumulate(micro, micro_loss, loss_scale, backward, moe), self.group)

    def train_batch(self, micro: list[dict[str, torch.Tensor]], loss_scale: float) -> StepOutcome:
        aux: dict[str, float] = {}  # MoE auxiliary losses for the log (empty for dense models)
        return StepOutcome(loss=self._loss(micro, loss_scale, backward=True, aux=aux), metrics=aux)

    def eval_batch(self, micro: list[dict[str, torch.Tensor]]) -> StepOutcome:
        # Validation reports the mean over batches of each batch's pair mean (weight 1 per batch).
        return StepOutcome(loss=self._loss(micro, 1.0, backward=False),
                           tokens=int(counted_tokens(micro, self.group).item()))
