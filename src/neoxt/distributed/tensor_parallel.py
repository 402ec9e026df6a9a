"""Tensor parallel over the mesh's ``tp`` dim: DTensor plans for every block, embedding and head.

Tensor parallel (Megatron layout, heads split across ranks): q/k/v/up/gate column-parallel,
o/down row-parallel; an untied embedding is vocab-parallel (replicated when compiling: torch 2.13
cannot backprop it out of a compiled block) and the untied head column-parallel with gathered
logits; tied embeddings stay replicated over ``tp`` (the head is then ``F.linear`` with the embedding
matrix, which a vocab-sharded DTensor cannot join). OLMo-3's q_norm/k_norm normalise the
*whole* q (k) projection, which TP shards: they become ``ShardedFeatureNorm``, which all-reduces the
statistics over ``tp`` (and all-reduces their gradient back, since each rank's features depend on
every rank's share of the sum). GPT-NeoX's per-head ``qk_norm`` is split by heads; its RMS variant
reduces over ``head_dim`` only and needs no communication.

Sequence parallel (``sequence_parallel: true``) shards the residual stream over the sequence between
sublayers: the block norms (attn_norm/mlp_norm, in every placement: pre, post, olmo3, parallel) and
the final norm run on sequence shards, attention and MLP inputs are all-gathered and their outputs
reduce-scattered. It is not applied to q_norm/k_norm/qk_norm (they act on head features, not the
residual stream), and it is refused with learned position embeddings (added to the full sequence
after the embedding).

MoE layers under TP (``apply_expert_tp``): the stacked expert weights are split on their hidden
width F (``gate``/``up`` column-like, ``down`` row-like), the shared experts take the dense MLP plan,
the router stays replicated; ``neoxt.model.moe`` sums the experts' partial outputs over ``tp`` before
the routing weights apply. Under sequence parallel the MoE input is gathered as a plain tensor and its
output scattered back to sequence shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from neoxt.config.schema import MAMBA_TYPES
from neoxt.errors import ConfigError


def blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The transformer blocks of a full model or of a pipeline stage (ModuleList or ModuleDict)."""
    layers = model.layers
    return iter(layers.values()) if isinstance(layers, nn.ModuleDict) else iter(layers)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group in forward *and* backward: the summed statistic feeds every rank's
    shard, so each rank's gradient of it is only its own share of the total.

    Not ``torch.distributed.nn.functional.all_reduce``: its in-place collective breaks
    ``torch.compile`` of TP blocks; functional collectives trace."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad.contiguous(), ctx.group), None


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_reduce(x, "sum", group)
    return out.wait() if hasattr(out, "wait") else out


class ShardedFeatureNorm(nn.Module):
    """RMSNorm / LayerNorm whose normalised features are split over the TP ranks.

    ``weight`` (and ``bias``) are DTensors sharded on dim 0 like the features, so state-dict names
    and global shapes equal the unsharded norm's. Statistics over a sharded dim are all-reduced.
    """

    def __init__(self, norm: nn.Module, tp_mesh: DeviceMesh, kind: str, reduce_dims: int, eps: float):
        super().__init__()
        self.kind, self.reduce_dims, self.eps = kind, reduce_dims, eps
        shape = tuple(norm.weight.shape)
        self.count = math.prod(shape[-reduce_dims:])
        # Sharded dim 0 of the weight is one of the reduced dims iff all weight dims are reduced.
        self.group = tp_mesh.get_group() if reduce_dims == len(shape) else None
        self.weight = nn.Parameter(distribute_tensor(norm.weight.data, tp_mesh, [Shard(0)]))
        bias = getattr(norm, "bias", None)
        self.bias = nn.Parameter(distribute_tensor(bias.data, tp_mesh, [Shard(0)])) if bias is not None else None

    def _sum(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        s = x.sum(dims, keepdim=True)
        return _AllReduceSum.apply(s, self.group) if self.group is not None else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        dims = tuple(range(-self.reduce_dims, 0))
        if self.kind == "rms":
            y = xf * torch.rsqrt(self._sum(xf * xf, dims) / self.count + self.eps)
            return _local(self.weight) * y.to(dtype)
        mean = self._sum(xf, dims) / self.count
        xc = xf - mean
        y = xc * torch.rsqrt(self._sum(xc * xc, dims) / self.count + self.eps)
        y = y * _local(self.weight).float()
        if self.bias is not None:
            y = y + _local(self.bias).float()
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, global={tuple(self.weight.shape)}, eps={self.eps}, allreduce={self.group is not None}"


def _norm_kind(norm: nn.Module) -> tuple[str, float]:
    if isinstance(norm, nn.LayerNorm):
        return "layer", norm.eps
    return "rms", norm.eps  # neoxt.model.norms.RMSNorm


def check_tp(model: nn.Module, tp: int, sequence_parallel: bool) -> None:
    """Refuse shapes TP cannot split evenly, naming the config keys."""
    cfg = model.cfg
    if set(cfg.attention_types) & MAMBA_TYPES:
        raise ConfigError(f"model_parallel_size={tp}: tensor parallelism is not supported for Mamba layers")
    for key, value in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_kv_heads", cfg.num_kv_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if value % tp:
            raise ConfigError(f"{key}={value} is not divisible by model_parallel_size={tp}")
    if cfg.moe_num_experts > 1:
        if cfg.moe_width % tp:
            raise ConfigError(f"the experts' width {cfg.moe_width} (moe_intermediate_size, else "
                              f"intermediate_size) is not divisible by model_parallel_size={tp}")
    if sequence_parallel and cfg.pos_emb == "learned":
        raise ConfigError("sequence_parallel is not supported with pos_emb: learned")


def apply_tp(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False, vocab_parallel_embedding: bool = True
) -> None:
    """Megatron-style tensor parallel over ``tp_mesh`` (see the module docstring)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    check_tp(model, tp, sequence_parallel)
    cfg = model.cfg
    sp = sequence_parallel
    seq_out = Shard(1) if sp else Replicate()

    # Embedding and head. Vocab-parallel only when untied and the padded vocab splits evenly.
    vocab_split = cfg.padded_vocab_size % tp == 0
    embed = getattr(model, "embed", None)
    head = getattr(model, "lm_head", None)
    top_plan: dict[str, object] = {}
    if embed is not None:
        if vocab_split and vocab_parallel_embedding and not cfg.tie_word_embeddings:
            top_plan["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq_out)
        elif sp:
            embed.register_forward_hook(_to_seq_shard_hook(tp_mesh))
    if head is not None and vocab_split and not cfg.value_head:  # a reward model's one-output head stays whole
        top_plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    final_norm = getattr(model, "final_norm", None)
    if sp and final_norm is not None:
        top_plan["final_norm"] = SequenceParallel()
    if top_plan:
        parallelize_module(model, tp_mesh, top_plan)
    if sp and final_norm is not None:
        final_norm.register_forward_hook(_gather_hook())

    for block in blocks(model):
        attn, mlp = block.attn, block.mlp
        moe = hasattr(mlp, "experts")
        plan: dict[str, object] = {
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(output_layouts=seq_out),
        }
        if not moe or mlp.shared is not None:  # a MoE layer's shared experts are a dense MLP, made whole
            plan.update(_dense_mlp_plan("mlp.shared", mlp.shared, Replicate()) if moe else
                        _dense_mlp_plan("mlp", mlp, seq_out))
        if sp:
            # Attention is called as attn(x, cos, sin, mask, kv_cache, plain): only x is sharded.
            plan["attn"] = PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None, None),
            )
            # A MoE layer's router works on plain tensors: the gathered input goes in as one. Its
            # gradient is whole on every rank (see neoxt.model.moe), so Replicate is right for it.
            plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_output=moe)
            # Local outputs: olmo3/post placements add the norm's output straight to the residual.
            plan["attn_norm"] = SequenceParallel(use_local_output=True)
            if block.mlp_norm is not None:
                plan["mlp_norm"] = SequenceParallel(use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
        if moe:
            apply_expert_tp(mlp.experts, tp_mesh)
            if sp:
                mlp.register_forward_hook(_to_seq_shard_hook(tp_mesh))
        # Shapes inside attention are per rank from now on.
        attn.heads //= tp
        attn.kv_heads //= tp
        for name, reduce_dims in (("q_norm", 1), ("k_norm", 1), ("qk_norm", None)):
            norm = getattr(attn, name, None)
            if norm is None or attn.head_qk_norms:  # per-head gains (Qwen3) see whole heads: no change
                continue
            kind, eps = _norm_kind(norm)
            if reduce_dims is None:  # [heads, head_dim] gain: LayerNorm reduces both, RMSNorm head_dim
                reduce_dims = 2 if kind == "layer" else 1
            setattr(attn, name, ShardedFeatureNorm(norm, tp_mesh, kind, reduce_dims, eps))


def _dense_mlp_plan(prefix: str, mlp: nn.Module, output: Replicate | Shard) -> dict[str, object]:
    """Megatron's MLP split: up/gate column-parallel, down row-parallel with ``output`` layout."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, object] = {f"{prefix}.up": ColwiseParallel(),
                               f"{prefix}.down": RowwiseParallel(output_layouts=output)}
    if mlp.gate is not None:
        plan[f"{prefix}.gate"] = ColwiseParallel()
    return plan


def apply_expert_tp(experts: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every expert's hidden width over ``tp_mesh``: ``gate``/``up`` [E, F, H] on F, ``down``
    [E, H, F] on F; the experts then sum their partial outputs over it (``neoxt.model.moe``)."""
    for name, dim in (("gate", 1), ("up", 1), ("down", 2)):
        param = getattr(experts, name)
        if param is not None:
            sharded = distribute_tensor(param.data, tp_mesh, [Shard(dim)])
            setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    experts.tp_mesh = tp_mesh


def _to_seq_shard_hook(tp_mesh: DeviceMesh):
    """Forward hook: a replicated [B, T, H] output -> this rank's sequence shard (backward gathers)."""

    def hook(module, args, out):
        dt = DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False)
        return dt.redistribute(tp_mesh, [Shard(1)]).to_local()

    return hook


def _gather_hook():
    """Forward hook: a sequence-sharded DTensor output -> the full replicated local tensor."""

    def hook(module, args, out):
        if isinstance(out, DTensor):
            return out.redistribute(out.device_mesh, [Replicate()]).to_local()
        return out

    return hook
