"""Post-training objectives: DPO on preference pairs and KTO on rewarded sequences (GPT-NeoX
``train_impl: dpo`` / ``kto``).

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
from neoxt.train.loop import unscale_gradients
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
    # The data-parallel process group (None: a single data-parallel rank). Only pair counts and loss
    # shares are summed over it; FSDP2 (train() parallelizes every model) reduces the gradients.
    group: Any = None

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
            unscale_gradients(self.model, loss_scale)
        return total


def _token_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log p(label) in fp32, zero where ``mask`` is False -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


@dataclass
class KTOObjective:
    """GPT-NeoX's KTO (training.py, after TRL): each micro-batch is split in two halves, and each half's
    KL baseline is the other half's clamped, detached mean log-ratio. Per sequence:
    ``0.5 * w * (1 - sigmoid(kto_beta * mean_t(reward) * (sum_t log-ratio - KL_other)))`` with ``w`` the
    half's mean of ``kto_desirable_weight`` (reward > 0) / ``kto_undesirable_weight`` (reward < 0).
    The micro-batch loss is the mean over its pairs of sequences; the step loss the mean over micro-batches
    (and data-parallel ranks), as upstream's per-micro-batch mean averaged by accumulation.
    """

    model: nn.Module
    reference: nn.Module | None
    beta: float
    desirable_weight: float
    undesirable_weight: float
    precision: str
    group: Any = None

    def _logits(self, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.precision, b["tokens"].device.type):
            return model(b["tokens"], positions=b.get("position_ids"), attn_mask=b.get("attention_mask"))

    def _micro_loss(self, b: dict[str, torch.Tensor], grad: bool) -> torch.Tensor:
        if "reward" not in b:
            raise ConfigError("train_impl: kto needs per-document rewards (train_reward_data_paths)")
        if b["tokens"].shape[0] % 2:
            raise ConfigError("train_impl: kto needs an even train_micro_batch_size_per_gpu (each micro-batch is split in halves)")
        mask = token_mask(b["labels"], b.get("loss_mask"))
        with torch.no_grad():
            if "ref" in b:
                ref = torch.where(mask, b["ref"].float(), torch.zeros_like(b["ref"].float()))
            else:
                assert self.reference is not None
                ref = _token_logps(self._logits(self.reference, b), b["labels"], mask)
            rewards = b["reward"].float()
            seq_reward = rewards.sum(-1)
            scaling = (seq_reward > 0.001).float() * self.desirable_weight
            scaling += (seq_reward < -0.001).float() * self.undesirable_weight
        with torch.set_grad_enabled(grad):
            pol = _token_logps(self._logits(self.model, b), b["labels"], mask)
        p1, p2 = pol.chunk(2)
        r1, r2 = ref.chunk(2)
        w1, w2 = rewards.chunk(2)
        s1, s2 = scaling.chunk(2)
        kl1 = torch.clamp((p1 - r1).sum(-1), min=0).mean().detach()
        kl2 = torch.clamp((p2 - r2).sum(-1), min=0).mean().detach()
        half1 = 0.5 * s1.mean() * (1 - torch.sigmoid(self.beta * w1.mean(-1) * ((p1 - r1).sum(-1) - kl2)))
        half2 = 0.5 * s2.mean() * (1 - torch.sigmoid(self.beta * w2.mean(-1) * ((p2 - r2).sum(-1) - kl1)))
        return (half1 + half2).mean()

    def __call__(self, micro: list[dict[str, torch.Tensor]], loss_scale: float = 1.0, backward: bool = True) -> torch.Tensor:
        device = micro[0]["tokens"].device
        count = _all_reduce_sum(torch.tensor(float(len(micro)), dtype=torch.float64, device=device), self.group)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for b in micro:
            loss = self._micro_loss(b, backward) / count.float()
            if backward:
                (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            total += loss.detach().double()
        _all_reduce_sum(total, self.group)
        if backward:
            unscale_gradients(self.model, loss_scale)
        return total


def build_objective(
    cfg: RunConfig,
    model: nn.Module,
    load_reference: Callable[[nn.Module], Any] | None,
    fresh_start: bool,
    group: Any = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> DPOObjective | KTOObjective:
    """The DPO or KTO objective for ``cfg``; ``load_reference(module)`` fills a module with the ``load`` weights.

    Call it with the model not yet parallelized (it is copied for the reference); ``prepare`` then
    parallelizes the frozen reference as the policy will be (``neoxt.distributed.parallelize``).

    Without ``load``, a fresh run takes the reference from the starting weights; a resumed run then
    has no way to recover them, which is an error rather than a silently different objective.
    """
    t = cfg.training
    if t.train_impl == "dpo" and cfg.data.dataset_impl != "pairwise":
        raise ConfigError("train_impl: dpo needs dataset_impl: pairwise (pos_/neg_train_data_paths)")
    reference = None
    needs_reference = not t.precompute_model_name and not (t.train_impl == "dpo" and t.dpo_reference_free)
    if needs_reference:
        reference = copy.deepcopy(model)
        if load_reference is not None:
            load_reference(reference)
        elif not fresh_start:
            raise ConfigError(
                f"train_impl: {t.train_impl} resumed without 'load': the reference model (the starting weights) cannot be "
                "recovered; set load to the model DPO started from, or use dpo_reference_free / precompute_model_name"
            )
        for p in reference.parameters():
            p.requires_grad_(False)
        if prepare is not None:
            reference = prepare(reference)
        reference.eval()
    if t.train_impl == "kto":
        return KTOObjective(
            model=model,
            reference=reference,
            beta=t.kto_beta,
            desirable_weight=t.kto_desirable_weight,
            undesirable_weight=t.kto_undesirable_weight,
            precision=t.precision,
            group=group,
        )
    return DPOObjective(
        model=model,
        reference=reference,
        beta=t.dpo_beta,
        fp32=t.dpo_fp32,
        reference_free=t.dpo_reference_free,
        precision=t.precision,
        group=group,
    )
