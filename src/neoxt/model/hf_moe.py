"""The HF mixture-of-experts families (Mixtral, OLMoE, Qwen3-MoE): config translation and name maps.

``neoxt.model.hf_names`` owns the shared parts (rotary fields, common keys, the shape checks; the
directory work stays in ``neoxt.convert.hf``) and registers these families beside its own, handing
MoE architectures to this module at four points: HF config → ``ModelConfig`` (``model_config``),
``ModelConfig`` → HF config (``hf_config``), one-to-one tensor names (``renames``) and the per-expert
tensors that stack into our ``experts.{gate,up,down}`` [E, ...] (``stacked``).

On disk (what ``save_pretrained`` writes and the Hub holds) every family keeps one tensor per expert
and projection; only the names differ:

- Mixtral: ``model.layers.{i}.block_sparse_moe.gate`` (router), ``…experts.{e}.w1`` (gate),
  ``w3`` (up), ``w2`` (down); LLaMA attention; softmax, top-k renormalised.
- OLMoE: ``model.layers.{i}.mlp.gate`` and ``…mlp.experts.{e}.{gate,up,down}_proj``; q/k RMSNorm
  over the whole projection (our ``use_separate_qk_norms``) with pre-norm blocks; ``norm_topk_prob``.
- Qwen3-MoE: OLMoE's expert names; q/k RMSNorm per head (``use_head_qk_norms``); dense MLP layers
  where ``mlp_only_layers`` / ``decoder_sparse_step`` say (``mlp.{gate,up,down}_proj``), expert width
  ``moe_intermediate_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from neoxt.config.schema import ModelConfig
from neoxt.errors import ConversionError

ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
    "olmoe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}


def config_class(arch: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    return {"mixtral": MixtralConfig, "olmoe": OlmoeConfig, "qwen3_moe": Qwen3MoeConfig}[arch]


def _qwen3_moe_layers(hf) -> tuple[int, ...]:
    step = hf.decoder_sparse_step or 1
    only = set(hf.mlp_only_layers or ())
    return tuple(i for i in range(hf.num_hidden_layers)
                 if i not in only and hf.num_experts > 0 and (i + 1) % step == 0)


def model_config(hf, arch: str, source: str, common: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for an HF MoE config; ``common`` holds the fields every gated family shares."""
    layers = hf.num_hidden_layers
    experts = hf.num_local_experts if arch == "mixtral" else hf.num_experts
    moe: dict[str, Any] = dict(
        moe_num_experts=experts, moe_top_k=hf.num_experts_per_tok, moe_router_type="topk",
        moe_score_func="softmax", moe_norm_topk_prob=True if arch == "mixtral" else bool(hf.norm_topk_prob),
        moe_aux_loss_coeff=float(hf.router_aux_loss_coef), use_bias_in_mlp=False, norm_placement="pre",
    )
    types = ("global",) * layers
    window = None
    if arch == "mixtral":
        if hf.sliding_window:
            types, window = ("sliding",) * layers, int(hf.sliding_window)
        moe["moe_jitter_eps"] = float(hf.router_jitter_noise) or None
    elif arch == "olmoe":
        if hf.clip_qkv is not None:
            raise ConversionError(f"{source}: clip_qkv {hf.clip_qkv} is not supported")
        moe["use_separate_qk_norms"] = True
    else:
        if hf.use_sliding_window:
            raise ConversionError(f"{source}: use_sliding_window: true is not supported for Qwen3-MoE")
        moe_layers = _qwen3_moe_layers(hf)
        moe.update(use_head_qk_norms=True, moe_intermediate_size=hf.moe_intermediate_size,
                   moe_layers=None if len(moe_layers) == layers else moe_layers)
        if not moe_layers:
            moe["moe_num_experts"] = 1
    return ModelConfig(**common, **moe, attention_types=types, sliding_window_width=window)


def architecture_for(cfg: ModelConfig) -> str:
    """The HF MoE family that can hold ``cfg``: its Q/K norm style decides."""
    if cfg.use_head_qk_norms:
        return "qwen3_moe"
    if cfg.use_separate_qk_norms:
        return "olmoe"
    return "mixtral"


def hf_config(cfg: ModelConfig, arch: str, common: dict[str, Any], checks: dict[str, bool],
              rope: dict[str, Any], extra: dict[str, Any]):
    """The transformers config for ``cfg`` (``common``/``checks`` as for the dense gated families)."""
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    every = len(moe_layers) == cfg.num_layers
    checks = {
        **checks,
        "norm_placement must be 'pre'": cfg.norm_placement == "pre",
        "moe_score_func must be softmax": cfg.moe_score_func == "softmax",
        "moe_num_shared_experts must be 0": cfg.moe_num_shared_experts == 0,
        "use_qk_layernorm is not supported": not cfg.use_qk_layernorm,
        "experts must be biasless (use_bias_in_mlp: false)": not cfg.use_bias_in_mlp,
    }
    if arch != "qwen3_moe":
        checks["every layer must be MoE"] = every
        checks["moe_intermediate_size must equal intermediate_size"] = cfg.moe_width == cfg.intermediate_size
    if arch != "mixtral":
        checks["all layers must be global attention"] = set(cfg.attention_types) == {"global"}
    else:
        checks["use_bias_in_attn_linear must be false"] = not cfg.use_bias_in_attn_linear
        checks["moe_norm_topk_prob must be true"] = cfg.moe_norm_topk_prob
        checks["attention must be all global or all sliding"] = len(set(cfg.attention_types)) == 1
    bad = [what for what, ok in checks.items() if not ok]
    if bad:
        names = {v: k for k, v in ARCHITECTURES.items()}
        raise ConversionError(f"model config cannot be expressed as {names[arch]}: {'; '.join(bad)}")
    common = {**common, "router_aux_loss_coef": cfg.moe_aux_loss_coeff, "num_experts_per_tok": cfg.moe_top_k,
              "rope_parameters": rope, **extra}
    cls = config_class(arch)
    if arch == "mixtral":
        common.pop("attention_bias")
        window = cfg.sliding_window_width if "sliding" in cfg.attention_types else None
        return cls(**common, num_local_experts=cfg.moe_num_experts, sliding_window=window,
                   router_jitter_noise=cfg.moe_jitter_eps or 0.0, head_dim=cfg.head_dim)
    if arch == "olmoe":
        return cls(**common, num_experts=cfg.moe_num_experts, norm_topk_prob=cfg.moe_norm_topk_prob)
    dense = [i for i in range(cfg.num_layers) if i not in moe_layers]
    return cls(**common, num_experts=cfg.moe_num_experts, norm_topk_prob=cfg.moe_norm_topk_prob,
               moe_intermediate_size=cfg.moe_width, decoder_sparse_step=1, mlp_only_layers=dense,
               head_dim=cfg.head_dim)


def renames(cfg: ModelConfig, arch: str) -> Iterator[tuple[str, str]]:
    """(hf_name, our_name) for every tensor that maps one to one."""
    parts = {
        "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
        "self_attn.o_proj": "attn.o", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
        "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
    }
    yield "model.embed_tokens.weight", "embed.weight"
    block = _EXPERT_NAMES[arch][0]
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}."
        for hf_part, our_part in parts.items():
            yield layer + f"{hf_part}.weight", f"layers.{i}.{our_part}.weight"
        if cfg.is_moe_layer(i):
            yield layer + f"{block}.gate.weight", f"layers.{i}.mlp.router.weight"
        else:
            for proj in ("gate", "up", "down"):
                yield layer + f"mlp.{proj}_proj.weight", f"layers.{i}.mlp.{proj}.weight"
    yield "model.norm.weight", "final_norm.weight"
    yield "lm_head.weight", "lm_head.weight"


def stacked(cfg: ModelConfig, arch: str) -> Iterator[tuple[str, list[str]]]:
    """(our stacked expert tensor, its HF per-expert tensor names in expert order)."""
    if arch not in _EXPERT_NAMES:
        return
    block, names = _EXPERT_NAMES[arch]
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        for ours, theirs in names.items():
            yield (f"layers.{i}.mlp.experts.{ours}",
                   [f"model.layers.{i}.{block}.experts.{e}.{theirs}.weight" for e in range(cfg.moe_num_experts)])
