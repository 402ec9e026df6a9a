"""KTO on rewarded sequences (GPT-NeoX ``train_impl: kto``, after upstream's training.py and TRL).

Each micro-batch is split in two halves, and each half's KL baseline is the other half's clamped,
detached mean log-ratio. Per sequence:
``0.5 * w * (1 - sigmoid(kto_beta * mean_t(reward) * (sum_t log-ratio - KL_other)))`` with ``w`` the
half's mean of ``kto_desirable_weight`` (reward > 0) / ``kto_undesirable_weight`` (reward < 0). The
micro-batch loss is the mean over its pairs of sequences; the step loss the mean over micro-batches
(and data-parallel ranks), as upstream's per-micro-batch mean averaged by accumulation.
MoE policies add their routers' auxiliary losses to the backward as the LM objective does, never the
reference's (``objectives/base.moe_aux_term`` says how); the reported loss stays the KTO loss.
"""

from __future__ import annotations

import torch

from neoxt.distributed.mesh import all_reduce_sum
from neoxt.errors import ConfigError
from neoxt.train.losses import token_mask
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


class KTOObjective(Stateless):
    """The reference is rebuilt from ``load`` on resume (see ``frozen_reference``): no extra state."""

    def __init__(self, ctx: ObjectiveContext):
        t = ctx.cfg.training
        self.reference = frozen_reference(ctx, not t.precompute_model_name)
        self.model = ctx.parallelize(ctx.model)
        self.parts = [self.model]
        self.beta, self.precision, self.group = t.kto_beta, t.precision, ctx.group
        self.desirable_weight, self.undesirable_weight = t.kto_desirable_weight, t.kto_undesirable_weight
        self.chunk = loss_chunk_size(ctx.cfg)

    def _micro_loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reward" not in b:
            raise ConfigError("train_impl: kto needs per-document rewards (train_reward_data_paths)")
        if b["tokens"].shape[0] % 2:
            raise ConfigError("train_impl: kto needs an even train_micro_batch_size_per_gpu (each micro-batch is split in halves)")
        mask = token_mask(b["labels"], b.get("loss_mask"))
        with torch.no_grad():  # the reference first: the MoE aux term reads the last forward, the policy's
            if "ref" in b:
                ref = torch.where(mask, b["ref"].float(), torch.zeros_like(b["ref"].float()))
            else:
                assert self.reference is not None
                ref = token_logprobs(self.reference, b, self.precision, self.chunk)
            rewards = b["reward"].float()
            seq_reward = rewards.sum(-1)
            scaling = (seq_reward > 0.001).float() * self.desirable_weight
            scaling += (seq_reward < -0.001).float() * self.undesirable_weight
        pol = token_logprobs(self.model, b, self.precision, self.chunk)
        p1, p2 = pol.chunk(2)
        r1, r2 = ref.chunk(2)
        w1, w2 = rewards.chunk(2)
        s1, s2 = scaling.chunk(2)
        kl1 = torch.clamp((p1 - r1).sum(-1), min=0).mean().detach()
        kl2 = torch.clamp((p2 - r2).sum(-1), min=0).mean().detach()
        half1 = 0.5 * s1.mean() * (1 - torch.sigmoid(self.beta * w1.mean(-1) * ((p1 - r1).sum(-1) - kl2)))
        half2 = 0.5 * s2.mean() * (1 - torch.sigmoid(self.beta * w2.mean(-1) * ((p2 - r2).sum(-1) - kl1)))
        return (half1 + half2).mean()

    def _loss(
        self, micro: list[dict[str, torch.Tensor]], loss_scale: float, backward: bool, aux: dict[str, float] | None = None
    ) -> torch.Tensor:
        device = micro[0]["tokens"].device
        count = all_reduce_sum(torch.tensor(float(len(micro)), dtype=torch.float64, device=device), self.group)
        moe = moe_aux_term(self.model, len(micro), self.group, aux) if backward else None
        total = accumulate(micro, lambda b: self._micro_loss(b) / count.float(), loss_scale, backward, moe)
        return all_reduce_sum(total, self.group)

    def train_batch(self, micro: list[dict[str, torch.Tensor]], loss_scale: float) -> StepOutcome:
        aux: dict[str, float] = {}  # MoE auxiliary losses for the log (empty for dense models)
        return StepOutcome(loss=self._loss(micro, loss_scale, backward=True, aux=aux), metrics=aux)

    def eval_batch(self, micro: list[dict[str, torch.Tensor]]) -> StepOutcome:
        return StepOutcome(loss=self._loss(micro, 1.0, backward=False),
                           tokens=int(counted_tokens(micro, self.group).item()))
