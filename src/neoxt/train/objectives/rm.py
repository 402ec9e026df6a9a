"""Reward models on preference pairs (GPT-NeoX ``train_impl: rm``, after the fork's training.py and
TRL's ``RewardTrainer``).

The model carries a scalar value head (``ModelConfig.value_head``, set by ``train_impl: rm``). Each
sequence is scored at its last counted position (``neoxt.model.value_head``); the loss is
``-logsigmoid(chosen - rejected)`` averaged over the pairs of the global batch, plus the fork's
``z_loss * (chosen^2 + rejected^2)`` centring term. A batch holds the chosen rows then the rejected
rows (``dataset_impl: pairwise``, the ``pos_``/``neg_`` paths, as DPO reads them). The fork gathers
every counted position and so needs exactly one label per sequence (its ``--for-rm`` data); reading
the last one is the same on such data and also works on ordinary label files.

Metrics: ``accuracy`` (share of pairs with chosen > rejected), ``margin`` (mean chosen - rejected),
``chosen_reward`` and ``rejected_reward`` (mean scores), over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neoxt.distributed.mesh import all_reduce_sum
from neoxt.errors import ConfigError
from neoxt.model.value_head import last_position_values
from neoxt.train.losses import token_mask
from neoxt.train.objectives.base import ObjectiveContext, Stateless, StepOutcome, forward_logits
from neoxt.train.objectives.lm import counted_tokens

_SUMS = ("loss", "correct", "margin", "chosen", "rejected")


class RewardModelObjective(Stateless):
    """Pairwise (Bradley-Terry) loss on a value-head model; no state beyond the model."""

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.data.dataset_impl != "pairwise":
            raise ConfigError("train_impl: rm needs dataset_impl: pairwise (pos_/neg_train_data_paths)")
        if not cfg.model.value_head:
            raise ConfigError("train_impl: rm needs value_head: true (the default for train_impl: rm)")

    def __init__(self, ctx: ObjectiveContext):
        self.check_config(ctx.cfg)
        self.model = ctx.parallelize(ctx.model)
        self.parts = [self.model]
        self.precision, self.group, self.z_loss = ctx.cfg.training.precision, ctx.group, ctx.cfg.training.z_loss

    def _scores(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if b["tokens"].shape[0] % 2:
            raise ConfigError("train_impl: rm needs preference batches (dataset_impl: pairwise)")
        values = forward_logits(self.model, b, self.precision)[..., 0].float()
        scores = last_position_values(values, token_mask(b["labels"], b.get("loss_mask")))
        return scores.chunk(2)

    def _run(self, micro: list[dict[str, torch.Tensor]], loss_scale: float, backward: bool) -> StepOutcome:
        device = micro[0]["tokens"].device
        pairs = all_reduce_sum(torch.tensor(float(sum(b["tokens"].shape[0] // 2 for b in micro)),
                                            dtype=torch.float64, device=device), self.group)
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
        for b in micro:
            with torch.set_grad_enabled(backward):
                chosen, rejected = self._scores(b)
                per_pair = -F.logsigmoid(chosen - rejected) + self.z_loss * (chosen.square() + rejected.square())
                loss = per_pair.sum() / pairs.float()
            if backward:
                (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            diff = (chosen - rejected).detach().double()
            sums += torch.stack([loss.detach().double() * pairs, (diff > 0).double().sum(), diff.sum(),
                                 chosen.detach().double().sum(), rejected.detach().double().sum()])
        sums = all_reduce_sum(sums, self.group) / pairs
        metrics = {"accuracy": float(sums[1]), "margin": float(sums[2]), "chosen_reward": float(sums[3]),
                   "rejected_reward": float(sums[4])}
        return StepOutcome(loss=sums[0], metrics=metrics)

    def train_batch(self, micro: list[dict[str, torch.Tensor]], loss_scale: float) -> StepOutcome:
        return self._run(micro, loss_scale, backward=True)

    def eval_batch(self, micro: list[dict[str, torch.Tensor]]) -> StepOutcome:
        outcome = self._run(micro, 1.0, backward=False)
        outcome.tokens = int(counted_tokens(micro, self.group).item())
        return outcome
