"""Context parallelism: each rank of the mesh's ``cp`` dim holds 1/cp of every sequence.

Layout (the load balance of torch's and Megatron's context parallelism): a sequence is cut into
2·cp chunks and cp rank r keeps chunks r and 2·cp-1-r, one early and one late, so every rank gets
the same share of the causal triangle. ``shard_batch`` splits every [B, T] tensor of a micro-batch
that way before the forward (tokens, labels, loss mask, position ids; the document mask's query
rows), and always sends position ids, so rotary and learned positions stay the tokens' global ones.
The loss needs nothing more: each rank sums its own tokens' losses, and token counts and loss
shares are summed over dp x cp (``neoxt.distributed.mesh.dp_group``); FSDP sums gradients there.

Attention, two ways (``SequenceSplit.attend``, called by ``neoxt.model.attention.Attention``):

- **Causal attention and nothing else** (every layer of a GPT-NeoX / LLaMA pretraining run): torch's
  ring attention, ``_templated_ring_attention`` from torch.distributed.tensor.experimental's context
  parallel. K/V blocks travel round the cp group, each step runs the fused SDPA kernel on one block
  and the partial outputs are merged by their log-sum-exp; the backward passes K/V gradients round
  the same way; under GQA the K/V travel with their own (fewer) heads and are widened per block
  just before the kernel. We call torch's ring directly with the kernel for the device (CPU flash on
  CPU, flash for bf16/fp16 and memory-efficient for fp32 on CUDA) instead of going through torch's public
  ``context_parallel``: that one only dispatches the CUDA kernels — so nothing could be checked on
  the CPU machines CI has — and monkey-patches ``F.scaled_dot_product_attention`` for the whole
  process while it is active.
- **A document mask** (``reset_attention_mask``) **or a sliding window**: the ring's blocks cannot
  carry a mask, so K/V are all-gathered over cp (the backward reduce-scatters their gradients) and
  each rank attends its queries to the whole sequence under its rows of the mask, as torch's
  flex-attention context parallel does. Under GQA K/V are a fraction of the activations; the mask
  is [B, 1, T/cp, T].

What it does not do (refused in one line by ``check_context_parallel``): pipeline or expert
parallelism with it, Mamba layers (their scan runs along the whole sequence), attention dropout,
and objectives other than LM / SFT (DPO and KTO sum log-probabilities per sequence, which would
need a reduction over cp inside the loss).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp

from neoxt.config.schema import MAMBA_TYPES, RunConfig
from neoxt.errors import ConfigError

aten = torch.ops.aten

# Batch keys split along the sequence (dim 1); the document mask is handled on its own.
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def check_context_parallel(cfg: RunConfig) -> None:
    """Refuse, naming the keys, what context parallelism cannot run (before anything is built)."""
    cp = cfg.parallelism.context_parallel_size
    if cp == 1:
        return
    if cp < 1:
        raise ConfigError(f"context_parallel_size must be >= 1, got {cp}")
    par, m = cfg.parallelism, cfg.model
    if cfg.data.seq_length % (2 * cp):
        raise ConfigError(f"context_parallel_size={cp} needs seq_length divisible by 2 x {cp} (each rank keeps "
                          f"two chunks of every sequence); seq_length is {cfg.data.seq_length}")
    refused = {
        "pipe_parallel_size > 1": par.pipe_parallel_size > 1,
        "moe_expert_parallel_size > 1": par.moe_expert_parallel_size > 1,
        "Mamba layers (attention_config)": any(kind in MAMBA_TYPES for kind in m.attention_types),
        f"attention_dropout {m.attention_dropout}": m.attention_dropout > 0,
        f"train_impl {cfg.training.train_impl!r} (only 'normal': LM and SFT)": cfg.training.train_impl != "normal",
        "eval_tasks (lm-eval runs the model on whole sequences)": bool(cfg.evaluation.eval_tasks),
    }
    for what, hit in refused.items():
        if hit:
            raise ConfigError(f"context_parallel_size={cp} does not work with {what} yet")


def sequence_split(mesh: Any) -> SequenceSplit | None:
    """This rank's ``SequenceSplit`` on ``mesh`` (None: no mesh, or cp = 1)."""
    if mesh is None or "cp" not in (mesh.mesh_dim_names or ()) or mesh["cp"].size() == 1:
        return None
    cp = mesh["cp"]
    return SequenceSplit(rank=cp.get_local_rank(), size=cp.size(), group=cp.get_group())


def apply_context_parallel(model: torch.nn.Module, mesh: Any) -> None:
    """Give the model and each attention layer this rank's ``SequenceSplit`` (a no-op for cp = 1)."""
    split = sequence_split(mesh)
    if split is None:
        return
    model.context_parallel = split
    for module in model.modules():
        if hasattr(module, "context_parallel") and module is not model:
            module.context_parallel = split


@dataclass(frozen=True)
class SequenceSplit:
    """This rank's part of every sequence under the head-tail layout over ``size`` cp ranks."""

    rank: int
    size: int
    group: Any  # the cp process group

    def chunk_ids(self, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return r, 2 * self.size - 1 - r

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's two chunks of ``t`` along ``dim`` (whose length must divide by 2 x size)."""
        if t.shape[dim] % (2 * self.size):
            raise ValueError(f"context parallel: a sequence of {t.shape[dim]} tokens does not split into "
                             f"2 x {self.size} equal chunks")
        chunks = t.chunk(2 * self.size, dim)
        first, second = self.chunk_ids()
        return torch.cat([chunks[first], chunks[second]], dim)

    def slots(self, local_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence positions of this rank's ``local_len`` tokens, of the all-gathered K/V rows)."""
        everything = torch.arange(local_len * self.size, device=device)
        gathered = torch.cat([self._rank_slots(everything, r) for r in range(self.size)])
        return self._rank_slots(everything, self.rank), gathered

    def _rank_slots(self, everything: torch.Tensor, rank: int) -> torch.Tensor:
        chunks = everything.chunk(2 * self.size)
        first, second = self.chunk_ids(rank)
        return torch.cat([chunks[first], chunks[second]])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of this rank's queries [B, H, T/cp, D] over the whole sequence (see module doc).

        ``mask`` None means causal and nothing else (the ring); otherwise it is [B|1, 1, T/cp, T] over
        the K/V rows in all-gathered order (``slots``)."""
        if mask is None:
            return _ring_attention(q, k.contiguous(), v.contiguous(), self.group)
        k = funcol.all_gather_single_autograd(k.contiguous(), gather_dim=2, group=self.group)
        v = funcol.all_gather_single_autograd(v.contiguous(), gather_dim=2, group=self.group)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def shard_batch(batch: dict[str, Any], split: SequenceSplit) -> dict[str, Any]:
    """This rank's part of a micro-batch (module doc); position ids are made when the batch has none."""
    tokens = batch["tokens"]
    B, T = tokens.shape
    out = dict(batch)
    if out.get("position_ids") is None:
        out["position_ids"] = torch.arange(T, device=tokens.device).expand(B, T).contiguous()
    for key, value in batch.items():
        if key in SEQUENCE_KEYS or key in ("attention_mask", "position_ids"):
            continue
        if isinstance(value, torch.Tensor):
            raise ValueError(f"context parallel cannot split the batch's {key!r} along the sequence")
    for key in SEQUENCE_KEYS:
        if out.get(key) is not None:
            out[key] = split.shard(out[key], 1)
    mask = out.get("attention_mask")
    if mask is not None:  # [B, 1, T, T]: this rank's query rows; key columns in all-gathered order
        _, gathered = split.slots(T // split.size, mask.device)
        out["attention_mask"] = split.shard(mask, 2).index_select(3, gathered)
    return out


class SplitBatches:
    """A batch source whose micro-batches are this cp rank's parts (``shard_batch``); the position
    (``state_dict``) is the wrapped source's, so checkpoints match a run without context parallelism."""

    def __init__(self, source: Any, split: SequenceSplit):
        self.source, self.split = source, split

    def __iter__(self) -> SplitBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        return shard_batch(next(self.source), self.split)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The ring: torch's templated ring attention around the fused kernel of the device.


@dataclass(frozen=True)
class _Kernel:
    forward: Any
    backward: Any
    grad_name: str  # the backward op's name for the output gradient
    forward_kwargs: dict[str, Any]

    def backward_kwargs(self, rest: tuple[Any, ...]) -> dict[str, Any]:
        """The backward op's extra arguments from what the forward op returned after (out, lse)."""
        if self.forward is aten._scaled_dot_product_flash_attention:
            cum_q, cum_k, max_q, max_k, seed, offset = rest[:6]
            return {"cum_seq_q": cum_q, "cum_seq_k": cum_k, "max_q": max_q, "max_k": max_k, "dropout_p": 0.0,
                    "philox_seed": seed, "philox_offset": offset, "scale": None}
        if self.forward is aten._scaled_dot_product_efficient_attention:
            seed, offset = rest[:2]
            return {"attn_bias": None, "philox_seed": seed, "philox_offset": offset, "dropout_p": 0.0,
                    "grad_input_mask": (True, True, True, False), "scale": None}
        return {"dropout_p": 0.0, "scale": None}


def _kernel(q: torch.Tensor) -> _Kernel:
    if q.device.type == "cpu":
        return _Kernel(aten._scaled_dot_product_flash_attention_for_cpu,
                       aten._scaled_dot_product_flash_attention_for_cpu_backward.default, "grad_out",
                       {"dropout_p": 0.0, "scale": None})
    if q.dtype in (torch.bfloat16, torch.float16):
        return _Kernel(aten._scaled_dot_product_flash_attention,
                       aten._scaled_dot_product_flash_attention_backward.default, "grad_out",
                       {"dropout_p": 0.0, "scale": None})
    return _Kernel(aten._scaled_dot_product_efficient_attention,
                   aten._scaled_dot_product_efficient_attention_backward.default, "grad_out_",
                   {"attn_bias": None, "compute_log_sumexp": True, "dropout_p": 0.0, "scale": None})


@contextlib.contextmanager
def _head_tail_ring():
    """torch's ring reads the layout from a module-level option: head-tail (load-balanced) here."""
    options = torch_cp._cp_options
    before = options.enable_load_balance
    options.enable_load_balance = True
    try:
        yield
    finally:
        options.enable_load_balance = before


@torch.compiler.disable  # a compiled block runs the ring eagerly: dynamo cannot trace its collectives' loop
def _ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _RingAttention.apply(q, k, v, group)


def _gqa_forward(op: Any, groups: int):
    """``op`` for K/V with ``groups`` times fewer heads than Q: the kernels take as many K/V heads as
    query heads, so each block is widened just before the kernel and the ring passes the narrow K/V."""

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any):
        return op(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), **kwargs)

    return forward


def _gqa_backward(op: Any, groups: int):
    """The backward ``op`` for narrow K/V: gradients of the widened heads summed back per K/V head."""

    def backward(*, key: torch.Tensor, value: torch.Tensor, **kwargs: Any):
        dq, dk, dv, *rest = op(key=key.repeat_interleave(groups, dim=1), value=value.repeat_interleave(groups, dim=1),
                               **kwargs)
        return (dq, dk.unflatten(1, (-1, groups)).sum(2), dv.unflatten(1, (-1, groups)).sum(2), *rest)

    return backward


class _RingAttention(torch.autograd.Function):
    """Causal attention of head-tail sequence shards over the cp group, forward and backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup):
        kernel, groups = _kernel(q), q.shape[1] // k.shape[1]
        op = _gqa_forward(kernel.forward, groups) if groups > 1 else kernel.forward
        with _head_tail_ring():
            out, lse, *rest = torch_cp._templated_ring_attention(
                group, 2, op, query=q, key=k, value=v, is_causal=True, **kernel.forward_kwargs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.kernel, ctx.rest, ctx.groups = group, kernel, tuple(rest), groups
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        kernel: _Kernel = ctx.kernel
        op = _gqa_backward(kernel.backward, ctx.groups) if ctx.groups > 1 else kernel.backward
        with _head_tail_ring():
            dq, dk, dv = torch_cp._templated_ring_attention_backward(
                ctx.group, 2, op, grad_out=grad.contiguous(), grad_out_name=kernel.grad_name,
                query=q, key=k, value=v, out=out, logsumexp=lse, is_causal=True,
                **kernel.backward_kwargs(ctx.rest))[:3]
        return dq, dk, dv, None


__all__ = ["SequenceSplit", "SplitBatches", "apply_context_parallel", "check_context_parallel", "sequence_split",
           "shard_batch"]
