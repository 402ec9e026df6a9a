"""Output projection + loss in token chunks, without ever holding the full ``[tokens, vocab]`` logits.

At seq 8192 and a 50k vocabulary the fp32 logits of one sequence are 1.6 GB, and the plain path keeps
several such tensors alive at once (logits, log-softmax saved for backward, its gradient). Here the
final hidden states ``h`` [N, H] and the output weight ``W`` [V, H] go in, and only ``chunk x V``
logits exist at any time. Two autograd functions, one per kind of loss:

- ``linear_cross_entropy`` (LM / SFT, a scalar sum): the gradients with respect to ``h`` and ``W``
  are computed chunk by chunk *during the forward* (the loss is a weighted sum of per-token terms
  whose weights are known then), so backward only scales them by the incoming scalar: no
  recomputation, and no slower than the plain path.
- ``linear_logprobs`` (DPO, KTO: per-token log p(label), whose upstream gradient differs per
  sequence): forward keeps only ``h``, ``W`` and the per-token log-sum-exp; backward recomputes each
  chunk's logits (one extra output matmul, as activation checkpointing of the head would).

Numerics follow the plain path: the matmul runs in the input dtype (the autocast dtype, see
``neoxt.train.objectives.base.output_head``) and everything after it in fp32.
"""

from __future__ import annotations

import torch


def _chunks(n: int, chunk: int):
    return ((s, min(s + chunk, n)) for s in range(0, n, chunk))


def _accumulate(grad_w: torch.Tensor, d: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32) += d.T @ h, in place when the inputs are fp32 too (no [V, H] temporary)."""
    if d.dtype == torch.float32:
        grad_w.addmm_(d.t(), h)
    else:
        grad_w.add_((d.t() @ h).float())


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would run in here: the autocast dtype when autocast is on."""
    kind = h.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * (lse_i - logit_i[y_i] + z * lse_i^2); gradients taken in forward (see module doc)."""

    @staticmethod
    def forward(ctx, h, weight, targets, weights, z_loss, chunk, track):  # type: ignore[override]
        with torch.autocast(h.device.type, enabled=False):
            return _LinearCrossEntropy._run(ctx, h, weight, targets, weights, z_loss, chunk, track)

    @staticmethod
    def _run(ctx, h, weight, targets, weights, z_loss, chunk, track):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if track else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if track else None
        for s, e in _chunks(h.shape[0], chunk):
            logits = (h[s:e] @ weight.t()).float()
            y, w = targets[s:e], weights[s:e]
            picked = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            # One pass over the [chunk, V] block: exp(logits - max) in place; its row sums give the
            # log-sum-exp and, divided through, the softmax the gradient needs.
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            lse = (top + sums.log()).squeeze(-1)
            total += (w * (lse - picked + z_loss * lse.square())).sum()
            if track:
                # d/dlogits = w * ((1 + 2 z lse) * softmax - onehot(y))
                d = exps.mul_((w * (1 + 2 * z_loss * lse)).unsqueeze(-1) / sums)
                d.scatter_add_(-1, y.unsqueeze(-1), -w.unsqueeze(-1))
                d = d.to(h.dtype)
                grad_h[s:e] = d @ weight
                _accumulate(grad_w, d, h[s:e])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None, None, None, None


class _LinearLogProbs(torch.autograd.Function):
    """(log p(y_i), lse_i) per token; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):  # type: ignore[override]
        with torch.autocast(h.device.type, enabled=False):
            return _LinearLogProbs._run(ctx, h, weight, targets, chunk)

    @staticmethod
    def _run(ctx, h, weight, targets, chunk):
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for s, e in _chunks(n, chunk):
            logits = (h[s:e] @ weight.t()).float()
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            logp[s:e] = logits.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1) - lse[s:e]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk = chunk
        return logp, lse

    @staticmethod
    def backward(ctx, g_logp, g_lse):  # type: ignore[override]
        h, weight, targets, lse = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        for s, e in _chunks(h.shape[0], ctx.chunk):
            logits = (h[s:e] @ weight.t()).float()
            # d logp/dlogits = onehot - p, d lse/dlogits = p
            d = torch.exp(logits.sub_(lse[s:e].unsqueeze(-1))).mul_((g_lse[s:e] - g_logp[s:e]).unsqueeze(-1))
            d.scatter_add_(-1, targets[s:e].unsqueeze(-1), g_logp[s:e].unsqueeze(-1))
            d = d.to(h.dtype)
            grad_h[s:e] = d @ weight
            _accumulate(grad_w, d, h[s:e])
        return grad_h, grad_w.to(weight.dtype), None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    z_loss: float = 0.0,
    chunk: int = 1024,
    recompute: bool = False,
) -> torch.Tensor:
    """Sum over tokens where ``mask`` of cross-entropy (+ ``z_loss * lse^2``) of ``hidden @ weight.T``.

    ``hidden`` [..., H], ``labels`` / ``mask`` [...] (bool). Equals ``lm_loss_sum(F.linear(hidden,
    weight), ...)[0]`` in value and gradients.

    ``recompute``: keep only the per-token log-sum-exp and recompute each chunk's logits in backward
    (``linear_token_logprobs``'s way) instead of holding the finished ``[V, H]`` weight gradient
    until backward. For schedules that run many micro-batches' forwards before their backwards
    (GPipe), where one such fp32 gradient per micro-batch would add up.
    """
    dtype = _compute_dtype(hidden)
    h, weight = hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype)
    flat_mask = mask.reshape(-1)
    targets = torch.where(flat_mask, labels.reshape(-1), torch.zeros_like(labels.reshape(-1)))
    weights = flat_mask.float()
    if recompute:
        logp, lse = _LinearLogProbs.apply(h, weight, targets, chunk)
        return (lse.square() * float(z_loss) - logp).mul(weights).sum()
    track = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, weights, float(z_loss), chunk, track)


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """log p(label) of each token under softmax(``hidden @ weight.T``) in fp32, 0 where not ``mask``."""
    dtype = _compute_dtype(hidden)
    h, weight = hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype)
    safe = torch.where(mask, labels, torch.zeros_like(labels)).reshape(-1)
    logp, _ = _LinearLogProbs.apply(h, weight, safe, chunk)
    logp = logp.reshape(labels.shape)
    return torch.where(mask, logp, torch.zeros_like(logp))

