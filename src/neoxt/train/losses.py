"""Training losses.

The language-model loss is returned as a *sum* over unmasked tokens plus the token count, not as a
mean: the loop divides by the unmasked-token count of the whole global batch (all micro-batches,
all data-parallel ranks), so gradient accumulation and data parallelism do not change the result,
and a micro-batch whose labels are all masked contributes exactly zero loss and zero gradient
instead of 0/0 = NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_mask(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Float mask of the tokens that count: loss_mask > 0 and a non-negative label."""
    mask = labels >= 0
    if loss_mask is not None:
        mask = mask & (loss_mask > 0)
    return mask


def lm_loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token cross-entropy over counted tokens, number of counted tokens).

    ``logits`` [B, T, V] (any float dtype; the loss is computed in fp32), ``labels`` [B, T] with
    ``-100`` (or any negative id) for "no target", ``loss_mask`` [B, T] optional 0/1. ``z_loss`` adds
    ``z_loss * logsumexp(logits)^2`` per counted token (PaLM-style logit drift penalty).
    """
    mask = token_mask(labels, loss_mask)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_mask = mask.reshape(-1)
    targets = torch.where(flat_mask, labels.reshape(-1), torch.full_like(labels.reshape(-1), IGNORE_INDEX))
    per_token = F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    if z_loss:
        lse = torch.logsumexp(flat_logits, dim=-1)
        per_token = per_token + z_loss * torch.where(flat_mask, lse.square(), torch.zeros_like(lse))
    return per_token.sum(), flat_mask.sum()


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of log p(label) over the counted tokens of each sequence -> [B] (fp32). Used by DPO/KTO."""
    return label_logprobs(logits, labels, token_mask(labels, loss_mask)).sum(-1)


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log p(label) from full logits, in fp32, 0 where ``mask`` is False -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair DPO loss, GPT-NeoX's formula: -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))."""
    return -F.logsigmoid(beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)))
