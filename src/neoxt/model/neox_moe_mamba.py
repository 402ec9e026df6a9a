"""GPT-NeoX checkpoint names ↔ ours for Mamba layers and mixture-of-experts MLPs (both unsharded,
``<idx>.<name>`` keys), with the checks that refuse what our model cannot reproduce exactly.

Facts, read from upstream GPT-NeoX (identical in the users' fork): ``megatron/model/mamba/mamba.py``,
``moe.py``, ``moe_mlp.py``, ``router.py``, ``transformer.py``, ``gpt2_model.py``, ``mpu/initialize.py``,
``tools/ckpts/convert_neox_to_mamba_ssm.py``.

Mamba (``attention_config`` entry ``"mamba"``; ``ParallelMambaResidualLayerPipe`` at the layer's
usual index): ``norm.{scale|weight,bias}`` then ``mixer.`` + ``in_proj.weight`` [2·d_inner, H]
(``x, z = chunk(2)``), ``conv1d.weight`` [d_inner, 1, 4] (+ ``conv1d.bias`` with
``mamba_use_bias_in_conv``), ``x_proj.weight`` [dt_rank + 2·16, d_inner], ``dt_proj.weight``
[d_inner, dt_rank], ``dt_proj.bias``, ``A_log`` [d_inner, 16], ``D`` [d_inner], ``out_proj.weight``
[H, d_inner]: the names and layout of our ``MambaBlock`` (``norm`` + Mamba-1 ``mixer``), so the map
is the identity. GPT-NeoX fixes ``d_state`` 16, ``d_conv`` 4 and ``dt_rank`` ceil(H/16); it has no
Mamba-2. With ``mamba_use_bias_in_linears`` it also gives ``x_proj`` a bias, which ours lacks.
Tensor parallelism: ``x_proj`` is a ``RowParallelLinear`` with ``parallel_output=True`` (no
all-reduce), so at TP > 1 each rank computes dt, B and C from its own slice of d_inner: such a
checkpoint is not one TP-1 model (upstream's converter concatenates anyway). Refused at TP > 1.

MoE (``ParallelDroplessMoE`` as the layer's ``mlp`` when ``layer_number % moe_expert_interval == 0``):
``mlp.router.layer.weight`` [E, H] (router logits, replicated on every TP rank), and megablocks'
stacked ``mlp.experts.mlp.w1`` / ``mlp.experts.mlp.w2``, each [E·F, H] with expert e in rows
e·F..(e+1)·F; the expert computes ``act(x @ w1_e.T) @ w2_e``, so our ``experts.up`` [E, F, H] is
``w1`` viewed per expert and our ``experts.down`` [E, H, F] is ``w2_e`` transposed. Under TP the
model-parallel group is the expert-parallel group: rank r holds experts r·E/tp..(r+1)·E/tp whole,
so w1/w2 concatenate on dim 0. Only ``ParallelGroupedMLP`` is ever built: experts are ungated
whatever ``activation`` says, dropless, biasless, with no shared experts and no renormalised top-k
(and under ``gpt_j_residual`` the layer returns the MoE output without the attention output);
the topk router weights by softmax, the sinkhorn router by sigmoid when ``moe_top_k`` is 1, else
softmax.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

from neoxt.config.schema import MAMBA_TYPES
from neoxt.errors import CheckpointError, ConversionError

if TYPE_CHECKING:
    import torch

    from neoxt.config.schema import ModelConfig

# GPT-NeoX's (and our) mixer tensors of a Mamba layer, without the optional biases.
MAMBA_MIXER = ("in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
               "A_log", "D", "out_proj.weight")
ROUTER = "mlp.router.layer.weight"
EXPERTS_W1 = "mlp.experts.mlp.w1"
EXPERTS_W2 = "mlp.experts.mlp.w2"


class Importer(Protocol):
    """What ``neoxt.model.neox_names._Importer`` offers the functions below."""

    cfg: ModelConfig

    def where(self, idx: int) -> str: ...
    def take(self, idx: int, name: str) -> torch.Tensor: ...
    def put(self, ours: str, t: torch.Tensor, idx: int, name: str) -> None: ...
    def move(self, ours: str, idx: int, name: str) -> None: ...
    def maybe(self, idx: int, name: str) -> bool: ...


def has_mamba(cfg: ModelConfig) -> bool:
    return any(t in MAMBA_TYPES for t in cfg.attention_types)


def has_moe(cfg: ModelConfig) -> bool:
    return any(cfg.is_moe_layer(i) for i in range(cfg.num_layers))


def neox_score_func(cfg: ModelConfig) -> str:
    """How GPT-NeoX's router weights the chosen experts (``router.py``)."""
    return "sigmoid" if cfg.moe_router_type == "sinkhorn" and cfg.moe_top_k == 1 else "softmax"


def _mamba_problem(cfg: ModelConfig) -> str | None:
    if "mamba2" in cfg.attention_types:
        return "attention_types has 'mamba2' (Mamba-2) layers; GPT-NeoX's Mamba is Mamba-1 only"
    rank = math.ceil(cfg.hidden_size / 16)
    if (cfg.mamba_d_state, cfg.mamba_d_conv, cfg.mamba_rank) != (16, 4, rank):
        return (f"GPT-NeoX's Mamba fixes d_state 16, d_conv 4, dt_rank ceil(hidden_size/16) = {rank}; this config "
                f"has mamba_d_state {cfg.mamba_d_state}, mamba_d_conv {cfg.mamba_d_conv}, dt_rank {cfg.mamba_rank}")
    if cfg.mamba_use_bias_in_linears:
        return "mamba_use_bias_in_linears: GPT-NeoX then gives x_proj a bias too, which neoxt's Mamba block lacks"
    return None


def _moe_problem(cfg: ModelConfig) -> str | None:
    if cfg.gated:
        return (f"activation '{cfg.activation}' makes neoxt's experts gated; GPT-NeoX's MoE experts are ungated "
                "(w1 -> activation -> w2) whatever activation says")
    if cfg.gpt_j_residual:
        return ("gpt_j_residual: GPT-NeoX's parallel-residual layer drops the attention output beside an MoE "
                "(its MoE returns no bias, so output = mlp_output)")
    if cfg.moe_num_shared_experts:
        return f"moe_num_shared_experts {cfg.moe_num_shared_experts}: GPT-NeoX's MoE has no shared experts"
    if cfg.moe_norm_topk_prob:
        return "moe_norm_topk_prob: GPT-NeoX does not renormalise the top-k routing weights"
    if cfg.moe_token_dropping:
        return "moe_token_dropping: GPT-NeoX's MoE is dropless"
    want = neox_score_func(cfg)
    if cfg.moe_score_func != want:
        return (f"moe_score_func {cfg.moe_score_func}: GPT-NeoX's {cfg.moe_router_type} router with moe_top_k "
                f"{cfg.moe_top_k} weights experts by {want}")
    interval = tuple(i for i in range(cfg.num_layers) if i % cfg.moe_expert_interval == 0)
    if cfg.moe_layers is not None and tuple(sorted(cfg.moe_layers)) != interval:
        return (f"moe_layers {list(cfg.moe_layers)}: GPT-NeoX places MoE layers by moe_expert_interval only "
                f"(layers {list(interval)})")
    return None


def check_supported(cfg: ModelConfig) -> None:
    """Refuse, in one line, Mamba/MoE settings whose GPT-NeoX weights would compute something else."""
    problem = (_mamba_problem(cfg) if has_mamba(cfg) else None) or (_moe_problem(cfg) if has_moe(cfg) else None)
    if problem:
        raise ConversionError(f"config: {problem}; no exact GPT-NeoX counterpart")


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Refuse tensor-parallel layouts of these layers that are not one model, or cannot be split."""
    if tp > 1 and has_mamba(cfg):
        raise ConversionError(
            f"model parallel size {tp}: GPT-NeoX's Mamba x_proj is row-parallel without an all-reduce "
            "(parallel_output=True), so each rank's dt/B/C see only its slice; only TP 1 Mamba checkpoints map exactly"
        )
    if has_moe(cfg) and cfg.moe_num_experts % tp:
        raise ConversionError(f"cannot split moe_num_experts={cfg.moe_num_experts} over model parallel size {tp} "
                              "(GPT-NeoX puts whole experts on each rank)")


def import_mamba(m: Importer, idx: int, p: str, gain: str, bias: str, norm_bias: bool) -> None:
    """One GPT-NeoX Mamba layer into ``p`` (``layers.{i}.``): the same names, checked shapes."""
    m.move(p + "norm.weight", idx, f"norm.{gain}")
    if norm_bias or m.maybe(idx, f"norm.{bias}"):
        m.move(p + "norm.bias", idx, f"norm.{bias}")
    in_proj = m.take(idx, "mixer.in_proj.weight")
    if (rows := in_proj.shape[0]) != 2 * m.cfg.mamba_inner:
        raise CheckpointError(
            f"{m.where(idx)}: tensor '{idx}.mixer.in_proj.weight' has {rows} rows: the checkpoint's Mamba d_inner is "
            f"{rows // 2}, the config's {m.cfg.mamba_inner} (GPT-NeoX sizes Mamba blocks from intermediate_size / "
            f"expansion_factor, even beside attention layers); set mamba_d_inner: {rows // 2}"
        )
    m.put(p + "mixer.in_proj.weight", in_proj, idx, "mixer.in_proj.weight")
    names = MAMBA_MIXER[1:] + (("conv1d.bias",) if m.cfg.mamba_use_bias_in_conv or m.maybe(idx, "mixer.conv1d.bias") else ())
    for name in names:
        m.move(p + "mixer." + name, idx, "mixer." + name)


def import_moe(m: Importer, idx: int, p: str) -> None:
    """One GPT-NeoX MoE MLP (router + megablocks' stacked w1/w2) into ``p + "mlp."``."""
    cfg = m.cfg
    E, F, H = cfg.moe_num_experts, cfg.moe_width, cfg.hidden_size
    m.move(p + "mlp.router.weight", idx, ROUTER)
    for name, ours in ((EXPERTS_W1, "up"), (EXPERTS_W2, "down")):
        t = m.take(idx, name)
        if tuple(t.shape) != (E * F, H):
            implied = (f"; the checkpoint implies an expert width of {t.shape[0] // E} (intermediate_size)"
                       if t.dim() == 2 else "")
            raise CheckpointError(
                f"{m.where(idx)}: tensor '{idx}.{name}' has shape {tuple(t.shape)}, the config expects {(E * F, H)} "
                f"(moe_num_experts {E} x expert width {F}, hidden_size {H}){implied}"
            )
        per_expert = t.reshape(E, F, H)
        m.put(p + f"mlp.experts.{ours}", per_expert if ours == "up" else per_expert.transpose(1, 2), idx, name)


def export_mamba(sd: dict[str, torch.Tensor], p: str, idx: int, gain: str, bias: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`import_mamba`."""
    out = {f"{idx}.norm.{gain}": sd[p + "norm.weight"]}
    if p + "norm.bias" in sd:
        out[f"{idx}.norm.{bias}"] = sd[p + "norm.bias"]
    for name in MAMBA_MIXER + ("conv1d.bias",):
        if p + "mixer." + name in sd:
            out[f"{idx}.mixer.{name}"] = sd[p + "mixer." + name]
    return out


def export_moe(sd: dict[str, torch.Tensor], cfg: ModelConfig, p: str, idx: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`import_moe`: router and the [E·F, H] stacks GPT-NeoX holds."""
    E, F, H = cfg.moe_num_experts, cfg.moe_width, cfg.hidden_size
    return {
        f"{idx}.{ROUTER}": sd[p + "mlp.router.weight"],
        f"{idx}.{EXPERTS_W1}": sd[p + "mlp.experts.up"].reshape(E * F, H),
        f"{idx}.{EXPERTS_W2}": sd[p + "mlp.experts.down"].transpose(1, 2).reshape(E * F, H),
    }


def config_hint(name: str, cfg: ModelConfig) -> str | None:
    """The keys that decide a Mamba/MoE tensor's existence and shape, for error messages."""
    if name.startswith("mixer."):
        return (f"attention_types={list(dict.fromkeys(cfg.attention_types))}, mamba_d_inner={cfg.mamba_inner}, "
                f"mamba_use_bias_in_conv={cfg.mamba_use_bias_in_conv}")
    if name.startswith(("mlp.router.", "mlp.experts.")):
        return (f"moe_num_experts={cfg.moe_num_experts}, moe_expert_interval={cfg.moe_expert_interval}, "
                f"intermediate_size={cfg.moe_width}")
    return None
