"""Turn one ``Transformer`` into its parallel form: float8 -> TP -> activation checkpointing -> compile ->
context parallel -> FSDP2.

How a training loop uses this package (what the tests in tests/distributed do)::

    from neoxt.distributed.mesh import init_distributed, build_mesh, dp_rank_size, dp_group
    env = init_distributed()                          # torchrun env -> gloo (CPU) / nccl (CUDA)
    mesh = build_mesh(cfg.parallelism)                # None for a lone process
    dp_rank, dp_size = dp_rank_size(mesh)             # which slice of the global batch to read
    model = parallelize(Transformer(cfg.model), cfg, mesh)   # or build_parallel_model(cfg, mesh, dev)
    opt = build_optimizer(model, ...)                 # after parallelize: FSDP swaps the parameters
    ...  loss = token_loss_sum / global_token_count;  loss.backward()
         # token counts and loss shares are summed over dp_group(mesh), NOT the world group
         # (tp/pp ranks of one dp rank see the same batch); FSDP sums the gradients itself
    clip_grad_norm_(model.parameters(), max_norm)     # this module's: grads live on several meshes
    # pipe_parallel_size > 1: neoxt.distributed.pipeline.build_pipeline(model, cfg, mesh, n_micro)
    #   and pipeline.step(tokens, labels) instead of forward/backward

The order is the one that composes (the torchtitan recipe): tensor parallel first (it swaps weights
for DTensors on the ``tp`` mesh), then activation checkpointing and ``torch.compile`` per block (they
wrap the block's forward, TP hooks included; with both, the compiled function runs inside an eager
checkpoint, since torch 2.13 cannot compile a checkpoint around DTensor code), FSDP2 last (it shards
whatever parameters it finds, DTensor or not, over the data-parallel mesh, and its all-gather hooks
sit outside the compiled block). Parameter names never change: checkpointing and compile replace a module's ``forward``
rather than wrapping the module, so ``state_dict`` keys, the optimizer's name-based param groups and
DCP checkpoints are the same with every combination of switches, and a checkpoint written under one
mesh loads under any other.

Tensor parallel (the Megatron layout, sequence parallel, MoE layers): ``neoxt.distributed.tensor_parallel``.

Expert parallelism (``moe_expert_parallel_size`` > 1, MoE models): ``apply_ep`` makes every MoE
layer's stacked expert weights DTensors sharded on the expert dim over the mesh's ``ep`` dim and
gives the experts the ``ep`` process group for their all-to-all token exchange
(``neoxt.model.moe``). FSDP then shards the experts over ``dp_mod_ep`` (the ranks that hold the same
experts) before each block over ``dp``, so expert gradients are summed only where experts are
replicated; each expert's gradient is already complete on its rank, the all-to-all's backward having
carried every rank's tokens' share back to it. Checkpoints hold the full [E, ...] tensors (DCP sees
the DTensor's global shape), so a run saved at one EP size resumes at another.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils.checkpoint import checkpoint

from neoxt.config.schema import RunConfig
from neoxt.distributed.tensor_parallel import apply_tp, blocks
from neoxt.errors import ConfigError


def parallelize(
    model: nn.Module,
    cfg: RunConfig,
    mesh: DeviceMesh | None,
    *,
    reshard_after_forward: bool = True,
    grad_reduction: str = "sum",
) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2 as ``cfg.parallelism`` says; returns ``model``.

    ``mesh`` comes from ``neoxt.distributed.mesh.build_mesh`` (None for a single process: only
    checkpointing and compile apply). Call it before creating the optimizer (FSDP replaces the
    parameters) and before loading a checkpoint (DCP loads into the sharded parameters).
    ``reshard_after_forward=False`` keeps gathered weights between forward and backward (pipeline
    stages run several micro-batches and would otherwise gather them once per micro-batch).

    ``grad_reduction``: how FSDP combines the data-parallel ranks' gradients. ``"sum"`` (default)
    matches neoxt's loss convention — every rank backpropagates its token-loss *sum divided by the
    token count of the whole global batch* — so the summed gradients are the global-mean gradient.
    ``"mean"`` averages them, for a loss that is each rank's own mean over equal-sized shards.
    """
    par = cfg.parallelism
    if cfg.training.float8_recipe:  # before FSDP, which must see the Float8Linear weights (checked in setup)
        from neoxt.distributed.float8 import apply_float8

        sharded = mesh is not None and mesh["dp"].size() > 1
        apply_float8(model, cfg.training.float8_recipe, fsdp_all_gather=sharded and cfg.training.float8_recipe == "tensorwise")
    if mesh is not None and mesh["tp"].size() > 1:
        # torch 2.13: a vocab-parallel embedding's backward fails when its gradient comes out of a
        # compiled block ('Tensor' object has no attribute '_local_tensor'); keep it replicated then.
        apply_tp(model, mesh["tp"], sequence_parallel=par.sequence_parallel, vocab_parallel_embedding=not par.compile)
    elif par.sequence_parallel and mesh is not None:
        warnings.warn("sequence_parallel needs model_parallel_size > 1; ignored", stacklevel=2)
    if par.checkpoint_activations:
        apply_activation_checkpointing(
            model, par.activation_checkpointing_mode, par.checkpoint_num_layers, compile=par.compile,
            option=par.selective_ac_option,
        )
    elif par.compile:
        apply_compile(model)
    names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
    ep_mesh = mesh["ep"] if "ep" in names else None
    if ep_mesh is not None:
        apply_ep(model, ep_mesh)
    cp = mesh["cp"].size() if "cp" in names else 1
    if cp > 1:
        from neoxt.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh)
    # FSDP also on a one-rank dp mesh when TP is on: it turns the parameters TP left plain (norms,
    # replicated embeddings) into DTensors too, so optimizers' foreach kernels never meet a mix of
    # DTensors and plain tensors ("aten._foreach_mul_.Scalar got mixed torch.Tensor and DTensor").
    # Under context parallelism FSDP shards over dp_shard x cp: cp ranks hold different tokens, so
    # their gradients are summed like data-parallel ones.
    if mesh is not None and (mesh["dp"].size() > 1 or mesh["tp"].size() > 1 or cp > 1):
        shard = "dp_shard_cp" if cp > 1 else "dp_shard"
        dp_mesh = mesh["dp_replicate", shard] if mesh["dp_replicate"].size() > 1 else mesh[shard]
        expert_mesh = mesh["dp_mod_ep"] if ep_mesh is not None else None
        apply_fsdp(model, dp_mesh, cfg.training.precision, reshard_after_forward, grad_reduction, expert_mesh)
    return model


def build_parallel_model(cfg: RunConfig, mesh: DeviceMesh | None, device: torch.device | str) -> nn.Module:
    """A parallelized ``Transformer`` whose full weights never exist on one device.

    Built on the meta device, parallelized (TP/AC/compile/FSDP), then only this rank's shards are
    allocated on ``device`` and initialised with ``neoxt.model.init.init_weights`` (DTensor random
    ops give each shard its part of one consistent full tensor). Use it for large models; small
    ones may equally be built on ``device`` and passed to ``parallelize``. Seed torch's RNG the same
    on every rank first.
    """
    from neoxt.model import Transformer
    from neoxt.model.init import init_weights

    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallelize(model, cfg, mesh)
    model.to_empty(device=device)
    init_weights(model, cfg.model)
    return model


# ---------------------------------------------------------------------------------------------
# FSDP2


def mixed_precision_policy(precision: str):
    """bf16/fp16 compute with fp32 gradient reduction (fp32 master weights stay sharded)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp16":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    precision: str,
    reshard_after_forward: bool = True,
    grad_reduction: str = "sum",
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """``fully_shard`` each block, then the root (embedding, final norm, head); with expert parallelism
    the MoE experts first, over ``expert_mesh`` (their DTensor weights already split over ``ep``)."""
    from torch.distributed.fsdp import fully_shard

    if grad_reduction not in ("sum", "mean"):
        raise ValueError(f"grad_reduction must be 'sum' or 'mean', got {grad_reduction!r}")
    mp = mixed_precision_policy(precision)
    experts = [m.mlp.experts for m in blocks(model) if hasattr(m.mlp, "experts")] if expert_mesh is not None else []
    for unit in experts:
        fully_shard(unit, mesh=expert_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    units = [*blocks(model), model]
    for unit in units:
        fully_shard(unit, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    units = experts + units
    if grad_reduction == "sum":
        for unit in units:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Split every MoE layer's experts over ``ep_mesh`` (see the module docstring)."""
    ep = ep_mesh.size()
    experts = [m.mlp.experts for m in blocks(model) if hasattr(m.mlp, "experts")]
    if not experts:
        raise ConfigError("moe_expert_parallel_size > 1 needs a MoE model (moe_num_experts > 1)")
    for module in experts:
        if module.num_experts % ep:
            raise ConfigError(f"moe_num_experts={module.num_experts} is not divisible by moe_expert_parallel_size={ep}")
        for name in ("gate", "up", "down"):
            param = getattr(module, name)
            if param is not None:
                sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)])
                setattr(module, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.ep_group = ep_mesh.get_group()


# ---------------------------------------------------------------------------------------------
# Activation checkpointing and compile


def _compiled(fn, compile: bool):
    return torch.compile(fn) if compile else fn


def _checkpoint_forward(module: nn.Module, compile: bool = False) -> None:
    """Recompute ``module``'s forward in backward; parameter names are untouched (no wrapper module).

    With ``compile`` the forward is compiled *inside* the eager checkpoint: torch 2.13 cannot
    compile a checkpoint around tensor-parallel (DTensor) code (AOTAutograd saves a DeviceMesh).
    """
    inner = _compiled(module.forward, compile)

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def _checkpoint_block(block: nn.Module, compile: bool = False, context_fn=None) -> None:
    """``_checkpoint_forward`` for a ``Block``, whose ``mask_for`` argument is a memoising closure:
    the mask is resolved before the checkpointed region so the recomputed forward is pure.
    ``context_fn``: a per-op selective policy (``_op_policy_contexts``); None recomputes everything."""
    inner = _compiled(block.forward, compile)
    extra = {} if context_fn is None else {"context_fn": context_fn}

    def forward(x, cos, sin, mask_for, kv_cache=None, plain=True):
        mask = mask_for(block.mask_key)
        return checkpoint(inner, x, cos, sin, lambda _window: mask, kv_cache, plain, use_reentrant=False, **extra)

    block.forward = forward


def _op_policy_contexts():
    """torchtitan's per-op selective policy, in our words: inside a checkpointed block keep the
    outputs of the expensive ops (attention kernels, and every other matmul, so the memory saved is
    about half of the matmul outputs) and recompute the cheap elementwise ones (norms, activations,
    RoPE, residual adds). A fresh counter per forward/recompute keeps the two passes' choices equal."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    matmuls = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    always = {getattr(aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
        if hasattr(aten, name)}
    counts = {False: 0, True: 0}  # matmuls seen in the forward / in the recompute

    def policy(ctx, func, *args, **kwargs):
        if func in matmuls:
            counts[ctx.is_recompute] += 1
            keep = counts[ctx.is_recompute] % 2 == 1
        else:
            keep = func in always
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _every_nth(option: str) -> int | None:
    """``selective_ac_option`` "N" (digits): checkpoint every N-th block fully; else None."""
    return int(option) if option.isdigit() else None


def apply_activation_checkpointing(model: nn.Module, mode: str, num_layers: int = 1, compile: bool = False,
                                   option: str | int = "attention") -> None:
    """``full``: recompute every block in backward (only block inputs are kept).
    ``selective``, as ``option`` (``selective_ac_option``) says, torchtitan's choices plus ours:
    ``attention`` recomputes each block's attention sublayer only (q/k/v, scores, o), keeping the
    MLP's; ``op`` checkpoints every block with a per-op policy (``_op_policy_contexts``: attention and
    every other matmul output kept, elementwise ops recomputed); an integer ``N`` fully checkpoints
    every N-th block (blocks 0, N, 2N, ...) and leaves the others alone.
    ``compile``: also compile what is checkpointed (and, for selective, the MLP) — see ``apply_compile``.

    GPT-NeoX's ``checkpoint_num_layers`` > 1 groups several blocks per recompute region to store
    fewer boundaries; with FSDP unsharding block by block, one region per block is never worse (a
    boundary is one [B, T, hidden] tensor, small beside what a block stores), so every block is its
    own region and the value only gets a warning.
    """
    if mode not in ("full", "selective"):
        raise ConfigError(f"activation_checkpointing_mode must be 'full' or 'selective', got {mode!r}")
    option = str(option)  # YAML gives an integer N as an int
    every = _every_nth(option)
    if mode == "selective" and option not in ("attention", "op") and not every:
        raise ConfigError(f"selective_ac_option must be 'attention', 'op' or a positive integer N (every N-th "
                          f"block), got {option!r}")
    if num_layers > 1 and mode == "full":
        warnings.warn(
            f"checkpoint_num_layers={num_layers}: each block is checkpointed separately (see "
            "neoxt.distributed.parallelize.apply_activation_checkpointing)",
            stacklevel=2,
        )
    for index, block in enumerate(blocks(model)):
        if mode == "full":
            _checkpoint_block(block, compile)
        elif option == "attention" and not hasattr(block, "attn"):
            _checkpoint_forward(block.mixer, compile)  # a Mamba block: its mixer is the sublayer
        elif option == "attention":
            _checkpoint_forward(block.attn, compile)
            if compile:
                block.mlp.compile()
        elif option == "op":
            _checkpoint_block(block, compile, context_fn=_op_policy_contexts)
        elif index % every == 0:
            _checkpoint_block(block, compile)
        elif compile:
            block.compile()


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` each block (same code per block, so one compiled graph is reused).

    Without activation checkpointing only; with it, ``apply_activation_checkpointing(compile=True)``
    compiles the checkpointed functions instead.
    """
    for block in blocks(model):
        block.compile()


# ---------------------------------------------------------------------------------------------
# Gradient clipping


@torch.no_grad()
def clip_grad_norm_(
    parameters, max_norm: float, norm_type: float = 2.0, pp_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parallelized models; returns the global norm (fp32).

    torch's version stacks per-parameter norms, which fails when gradients are DTensors on
    different meshes (FSDP x TP weights on the 2-D mesh, replicated norms on the dp mesh) or a mix
    of DTensors and plain tensors. Here every rank adds up ``|local shard|^p`` divided by how many
    ranks of its pipeline stage hold that same shard (stage ranks / number of distinct shards — a
    norm weight FSDP-sharded over dp only is still replicated over tp, though its mesh does not say
    so; a plain tensor is on every rank of the stage), and *one* all-reduce over all ranks sums the
    stages, shards and groups: the result is bit-identical on every rank, so replicated weights stay
    identical after clipping.
    ``pp_mesh`` (when pipelining) tells how many stages share the world. ``max_norm <= 0`` or
    ``inf`` only measures.
    """
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    world = dist.get_world_size() if dist.is_initialized() else 1
    stages = pp_mesh.size() if pp_mesh is not None else 1
    inf = norm_type == float("inf")
    device = grads[0].device if grads else torch.device("cpu")
    per_stage = world // stages
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            # Every non-Replicate dim splits the tensor (Shard, and FSDP-over-TP's _StridedShard).
            distinct = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if not pl.is_replicate())
            by_copies.setdefault(max(per_stage // distinct, 1), []).append(g.to_local())
        else:
            by_copies.setdefault(per_stage, []).append(g)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for copies, local in by_copies.items():
        norms = torch._foreach_norm(local, norm_type)
        if inf:
            total = torch.maximum(total, torch.stack(norms).max().float())
        else:
            total += torch.stack(norms).float().pow(norm_type).sum() / copies
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
    total = total if inf else total ** (1.0 / norm_type)
    if max_norm and 0 < max_norm < float("inf"):
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            for local in by_copies.values():
                torch._foreach_mul_(local, coef)
    return total
