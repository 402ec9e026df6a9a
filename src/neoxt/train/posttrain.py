"""Post-training objectives: DPO on preference pairs (GPT-NeoX ``train_impl: dpo``).

SFT needs nothing here: it is the language-model loss with label files (``-100`` = no target),
handled by the loop. DPO follows upstream's training.py: per sequence, the summed log-probability
of the counted tokens under the policy and under a frozen reference; loss
``-logsigmoid(dpo_beta * ((pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)))``, averaged over
the pairs of the global batch (so gradient accumulation does not change it). The reference is the
model the run started from: the weights of ``load`` (the usual ``finetune: true`` + ``load: <SFT
model>``), which a resumed run loads again, so resuming stays exact. ``dpo_reference_free`` uses 0
for the reference terms; precomputed reference log-probs (``precompute_model_name``) come with the
batch as ``ref``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neoxt.config.schema import RunConfig
from neoxt.errors import ConfigError
from neoxt.train.losses import dpo_loss, sequence_logprobs, token_mask
from neoxt.train.precision import autocast


def _all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    if group is not None:  # None: one data-parallel rank, nothing to sum
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


@dataclass
class DPOObjective:
    model: nn.Module
    reference: nn.Module | None
    beta: float
    fp32: bool
    reference_free: bool
    precision: str
    group: Any = None  # the data-parallel process group (None: a single data-parallel rank)

    def _logps(self, model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.precision, b["tokens"].device.type):
            logits = model(b["tokens"], positions=b.get("position_ids"), attn_mask=b.get("attention_mask"))
        # Log-probabilities are always taken in fp32 (upstream's dpo_fp32 default; false is accepted).
        logp = sequence_logprobs(logits, b["labels"], b.get("loss_mask"))
        return logp.chunk(2)

    def _reference(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = b["tokens"].shape[0] // 2
        if self.reference_free:
            zero = torch.zeros(rows, device=b["tokens"].device)
            return zero, zero
        if "ref" in b:
            mask = token_mask(b["labels"], b.get("loss_mask"))
            per_seq = torch.where(mask, b["ref"].float(), torch.zeros_like(b["ref"].float())).sum(-1)
            return per_seq.chunk(2)
        assert self.reference is not None
        with torch.no_grad():
            return self._logps(self.reference, b)

    def __call__(self, micro: list[dict[str, torch.Tensor]], loss_scale: float = 1.0, backward: bool = True) -> torch.Tensor:
        """Loss of one global batch (mean over its pairs, float64); gradients as the LM objective leaves them."""
        device = micro[0]["tokens"].device
        pairs = torch.zeros((), dtype=torch.float64, device=device)
        for b in micro:
            if b["tokens"].shape[0] % 2:
                raise ConfigError("train_impl: dpo needs preference batches (dataset_impl: pairwise)")
            pairs += b["tokens"].shape[0] // 2
        _all_reduce_sum(pairs, self.group)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for b in micro:
            ref_c, ref_r = self._reference(b)
            if backward:
                pi_c, pi_r = self._logps(self.model, b)
            else:
                with torch.no_grad():
                    pi_c, pi_r = self._logps(self.model, b)
            loss = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta).sum() / pairs.float()
            if backward:
                (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            total += loss.detach().double()
        _all_reduce_sum(total, self.group)
        if backward:
            params = [p for p in self.model.parameters() if p.grad is not None]
            if self.group is not None and not any(type(p).__name__ == "DTensor" for p in params):
                for p in params:
                    _all_reduce_sum(p.grad, self.group)
            if loss_scale != 1.0 and params:
                torch._foreach_mul_([p.grad for p in params], 1.0 / loss_scale)
        return total


def build_objective(
    cfg: RunConfig,
    model: nn.Module,
    load_reference: Callable[[nn.Module], Any] | None,
    fresh_start: bool,
    group: Any = None,
) -> DPOObjective:
    """The DPO objective for ``cfg``; ``load_reference(module)`` fills a module with the ``load`` weights.

    Without ``load``, a fresh run takes the reference from the starting weights; a resumed run then
    has no way to recover them, which is an error rather than a silently different objective.
    """
    t = cfg.training
    if cfg.data.dataset_impl != "pairwise":
        raise ConfigError("train_impl: dpo needs dataset_impl: pairwise (pos_/neg_train_data_paths)")
    reference = None
    needs_reference = not t.dpo_reference_free and not t.precompute_model_name
    if needs_reference:
        reference = copy.deepcopy(model)
        if load_reference is not None:
            load_reference(reference)
        elif not fresh_start:
            raise ConfigError(
                "train_impl: dpo resumed without 'load': the reference model (the starting weights) cannot be "
                "recovered; set load to the model DPO started from, or use dpo_reference_free / precompute_model_name"
            )
        reference.eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    return DPOObjective(
        model=model,
        reference=reference,
        beta=t.dpo_beta,
        fp32=t.dpo_fp32,
        reference_free=t.dpo_reference_free,
        precision=t.precision,
        group=group,
    )
