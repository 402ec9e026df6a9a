"""Hugging Face ↔ neoxt names and configs for the dense families (GPTNeoX, LLaMA, OLMo-3).

The MoE families (Mixtral, OLMoE, Qwen3-MoE) and Mamba / Mamba-2 are registered here too; their
specifics live in ``neoxt.model.hf_moe`` and ``neoxt.model.hf_mamba``.

Model knowledge, kept with the model (torchtitan's ``state_dict_adapter`` role): ``load_model`` reads
an HF directory through it, and ``convert/hf.py`` writes HF directories through it.

- ``detect_architecture(config_json, source)`` → ``"gpt_neox" | "llama" | "olmo3"`` (or an MoE key)
- ``model_config_from_hf(hf_config)`` → our ``ModelConfig`` (reads transformers' normalised config
  object, so both the transformers-4 form of config.json — ``rope_theta``, ``rotary_pct``,
  ``rotary_emb_base``, ``rope_scaling`` — and the transformers-5 ``rope_parameters`` form, per layer
  type for OLMo-3, are understood). RoPE scaling (linear, llama3, YaRN) maps onto the
  ``rope_scaling_*`` fields; OLMo-3's YaRN on full-attention layers only is
  ``rope_scaling_layers: global``, and ``hf_config_from_model_config`` writes the same dicts back.
- ``hf_config_from_model_config(cfg, arch)`` → a transformers config object.
- ``hf_to_neoxt_state_dict`` / ``neoxt_to_hf_state_dict`` → renamed, re-laid-out tensors, exact
  (no arithmetic on values, so a round trip is bit-identical). Shapes are checked against
  ``parameter_shapes`` (the model built on the meta device).

Layout traps handled here: HF GPTNeoX fuses Q, K, V into ``query_key_value`` interleaved *per head*
(output rows viewed as ``[heads, 3, head_dim]``); OLMo-3's ``q_norm``/``k_norm`` span the whole
projection (``heads * head_dim`` and ``kv_heads * head_dim``), not one head; OLMo-3's two norms sit
*after* attention and MLP (our ``attn_norm``/``mlp_norm`` with ``norm_placement: olmo3``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from neoxt.config.schema import MAMBA_TYPES, ModelConfig
from neoxt.errors import ConversionError
from neoxt.model import hf_mamba, hf_moe  # MoE and Mamba families: config translation and names
from neoxt.model.shapes import parameter_shapes

ARCHITECTURES = {
    "GPTNeoXForCausalLM": "gpt_neox",
    "LlamaForCausalLM": "llama",
    "Olmo3ForCausalLM": "olmo3",
    **hf_moe.ARCHITECTURES,
    **hf_mamba.ARCHITECTURES,
}
HF_CLASS = {arch: cls for cls, arch in ARCHITECTURES.items()}
# A reward model (``value_head``) is exported as the sequence-classification class (one label,
# scored at the last non-padding token); its value head is HF's ``score``.
SEQUENCE_CLASSIFICATION_CLASS = {arch: cls.replace("ForCausalLM", "ForSequenceClassification")
                                 for arch, cls in HF_CLASS.items()}


def hf_class_for(cfg: ModelConfig, arch: str) -> str:
    """The HF class name ``cfg`` exports as: ``*ForCausalLM``, or ``*ForSequenceClassification``."""
    return SEQUENCE_CLASSIFICATION_CLASS[arch] if cfg.value_head else HF_CLASS[arch]

# Tensors older HF GPTNeoX checkpoints carry that are buffers, not weights.
_IGNORABLE = re.compile(r"(^|\.)(attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")

_GATED_ACT = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}
_HF_ACT = {v: k for k, v in _GATED_ACT.items()}


def detect_architecture(config_json: Mapping[str, Any], source: str) -> str:
    """Our architecture key for an HF config.json, from ``architectures`` (else ``model_type``)."""
    names = list(config_json.get("architectures") or [])
    for name in names:
        base = str(name).replace("ForSequenceClassification", "ForCausalLM")  # a reward model: same body
        if base in ARCHITECTURES:
            return ARCHITECTURES[base]
    model_type = config_json.get("model_type")
    if not names and model_type in HF_CLASS:
        return model_type
    what = f"architectures {names}" if names else f"model_type {model_type!r}"
    raise ConversionError(
        f"{source}: unsupported {what}; supported: {', '.join(ARCHITECTURES)}"
    )


def hf_config_object(config_json: Mapping[str, Any], arch: str):
    """transformers' config object for a config.json dict (normalises old and new rope fields)."""
    from transformers import GPTNeoXConfig, LlamaConfig, Olmo3Config

    if arch in hf_mamba.ARCHITECTURES.values():
        return hf_mamba.hf_config_object(config_json, arch)
    cls = {"gpt_neox": GPTNeoXConfig, "llama": LlamaConfig, "olmo3": Olmo3Config}.get(arch) or hf_moe.config_class(arch)
    raw = dict(config_json)
    if arch == "olmo3" and "rope_theta" in raw and not raw.get("rope_parameters"):
        # transformers-4 OLMo-3 configs have one rope_theta for every layer; transformers 5 folds a
        # legacy rope_theta into the full-attention layers only and gives sliding layers its default.
        theta = raw.pop("rope_theta")
        raw["rope_parameters"] = {t: {"rope_type": "default", "rope_theta": theta}
                                  for t in ("sliding_attention", "full_attention")}
        if raw.get("rope_scaling"):
            raw["rope_parameters"]["full_attention"].update(raw.pop("rope_scaling"))
    return cls.from_dict(raw)


# HF rope_parameters key → our ModelConfig field, per scaling type (rope_theta and
# partial_rotary_factor are read separately; "type" is the transformers-4 spelling of rope_type).
_ROPE_KEYS = {
    "linear": {"factor": "rope_scaling_factor"},
    "llama3": {"factor": "rope_scaling_factor", "original_max_position_embeddings": "rope_original_max_position_embeddings",
               "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor"},
    "yarn": {"factor": "rope_scaling_factor", "original_max_position_embeddings": "rope_original_max_position_embeddings",
             "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "attention_factor": "rope_attention_factor"},
}
_ROPE_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _rope_scaling_fields(params: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Our rope_scaling_* fields for one HF rope_parameters dict (one-line error on what we lack)."""
    from neoxt.model.rope import scaled_inv_frequencies

    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type not in _ROPE_KEYS:
        raise ConversionError(f"{source}: rope_type {rope_type!r} is not supported "
                              f"(supported: default, {', '.join(_ROPE_KEYS)})")
    params = dict(params)
    if rope_type == "yarn" and params.get("truncate", True) is not True:
        raise ConversionError(f"{source}: rope_parameters truncate={params['truncate']!r} (YaRN) is not supported")
    params.pop("truncate", None)
    if rope_type == "yarn" and (params.get("mscale") is not None or params.get("mscale_all_dim") is not None):
        # DeepSeek-style mscale only sets the attention factor: keep the value it gives.
        _, factor = scaled_inv_frequencies(2, 10000.0, {**params, "rope_type": "yarn"}, 1)
        params.setdefault("attention_factor", factor)
        params.pop("mscale", None)
        params.pop("mscale_all_dim", None)
    keys = _ROPE_KEYS[rope_type]
    unknown = sorted(set(params) - set(keys) - _ROPE_COMMON)
    if unknown:
        raise ConversionError(f"{source}: rope_parameters key {unknown[0]!r} is not supported for rope_type {rope_type!r}")
    if params.get("factor") is None:
        raise ConversionError(f"{source}: rope_parameters for rope_type {rope_type!r} need a 'factor'")
    fields: dict[str, Any] = {"rope_scaling_type": rope_type}
    for key, field in keys.items():
        value = params.get(key)
        if value is None:
            continue
        fields[field] = int(value) if key == "original_max_position_embeddings" else float(value)
    return fields


def _rope(hf, arch: str, source: str) -> dict[str, Any]:
    """Our rotary fields (base, fraction, scaling) for an HF config's rope_parameters.

    OLMo-3 keeps one dict per layer type: equal dicts mean scaling on every layer; plain RoPE on
    sliding layers with scaling on full-attention layers (its long-context checkpoints) is
    ``rope_scaling_layers: global``; anything else has no neoxt equivalent.
    """
    params = dict(hf.rope_parameters or {})
    layers = "all"
    if arch == "olmo3":
        per_type = {t: dict(params.get(t) or {}) for t in set(hf.layer_types)}
        full, sliding = per_type.get("full_attention"), per_type.get("sliding_attention")
        scaled = {t for t, p in per_type.items() if p.get("rope_type", p.get("type", "default")) != "default"}
        plain = {k: v for k, v in (full or {}).items() if k in ("rope_theta", "partial_rotary_factor")}
        if full is not None and sliding is not None and scaled == {"full_attention"} and \
                {k: v for k, v in sliding.items() if k not in ("rope_type", "type")} == plain:
            layers = "global"
        elif len({tuple(sorted(p.items())) for p in per_type.values()}) != 1:
            raise ConversionError(
                f"{source}: rope_parameters differ between layer types ({per_type}); neoxt supports the same "
                "rotary setting for all layers, or scaling on full_attention layers only"
            )
        params = full if full is not None else next(iter(per_type.values()))
    fields = _rope_scaling_fields(params, source)
    if fields:
        fields["rope_scaling_layers"] = layers
    fields["rotary_emb_base"] = float(params.get("rope_theta", 10000.0))
    fields["rotary_pct"] = float(params.get("partial_rotary_factor", 1.0))
    return fields


def _hf_rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' rope_parameters for the layers ``cfg`` scales (the inverse of ``_rope``)."""
    from neoxt.model.rope import scaling_parameters

    params = {"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base)}
    params.update(scaling_parameters(cfg) or {})
    if cfg.rope_original_max_position_embeddings is None:
        params.pop("original_max_position_embeddings", None)  # HF fills in max_position_embeddings itself
    return params


def _is_reward_model(hf, source: str) -> bool:
    """An HF ``*ForSequenceClassification`` with one label is a reward model (our value head)."""
    value_head = any(str(n).endswith("ForSequenceClassification") for n in (getattr(hf, "architectures", None) or []))
    if value_head and getattr(hf, "num_labels", 1) != 1:
        raise ConversionError(f"{source}: a sequence classifier with {hf.num_labels} labels; neoxt reads reward "
                              "models (one label)")
    return value_head


def model_config_from_hf(hf, arch: str, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a transformers config object of architecture ``arch``."""
    if arch in hf_mamba.ARCHITECTURES.values():
        return hf_mamba.model_config_from_hf(hf, arch, source)
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    if head_dim * heads != hf.hidden_size:
        raise ConversionError(
            f"{source}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hf.hidden_size}; "
            "neoxt needs head_dim = hidden_size / num_attention_heads"
        )
    value_head = _is_reward_model(hf, source)
    rope = _rope(hf, arch, source)
    pct = rope["rotary_pct"]
    if int(head_dim * pct) % 2:
        raise ConversionError(f"{source}: partial_rotary_factor {pct} gives an odd rotary dimension")
    common = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=heads,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        padded_vocab_size=hf.vocab_size,
        pos_emb="rotary",
        **rope,
        no_weight_tying=not hf.tie_word_embeddings,
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf, "initializer_range", 0.02)),
        value_head=value_head,
    )
    if arch == "gpt_neox":
        if hf.hidden_act != "gelu":
            raise ConversionError(f"{source}: hidden_act {hf.hidden_act!r} is not supported for GPTNeoX (only 'gelu')")
        return ModelConfig(
            **common,
            num_kv_heads=heads,
            norm="layernorm",
            layernorm_epsilon=hf.layer_norm_eps,
            use_bias_in_norms=True,
            norm_placement="pre",
            gpt_j_residual=bool(hf.use_parallel_residual),
            activation="gelu",
            use_bias_in_attn_linear=bool(hf.attention_bias),
            use_bias_in_mlp=True,
            attention_types=("global",) * hf.num_hidden_layers,
            hidden_dropout=float(hf.hidden_dropout or 0.0),
        )
    if hf.hidden_act not in _GATED_ACT:
        raise ConversionError(f"{source}: hidden_act {hf.hidden_act!r} is not supported (use one of {sorted(_GATED_ACT)})")
    gated = dict(
        num_kv_heads=hf.num_key_value_heads or heads,
        norm="rmsnorm",
        rms_norm_epsilon=hf.rms_norm_eps,
        use_bias_in_norms=False,
        activation=_GATED_ACT[hf.hidden_act],
        use_bias_in_attn_linear=bool(getattr(hf, "attention_bias", False)),  # Mixtral has none
    )
    if arch in hf_moe.ARCHITECTURES.values():
        return hf_moe.model_config(hf, arch, source, {**common, **gated})
    if arch == "llama":
        return ModelConfig(
            **common, **gated,
            norm_placement="pre",
            use_bias_in_mlp=bool(getattr(hf, "mlp_bias", False)),
            attention_types=("global",) * hf.num_hidden_layers,
        )
    types = tuple("sliding" if t == "sliding_attention" else "global" for t in hf.layer_types)
    unknown = set(hf.layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ConversionError(f"{source}: layer_types {sorted(unknown)} are not supported")
    return ModelConfig(
        **common, **gated,
        norm_placement="olmo3",
        use_separate_qk_norms=True,
        use_bias_in_mlp=False,
        attention_types=types,
        sliding_window_width=hf.sliding_window if "sliding" in types else None,
    )


def architecture_for(cfg: ModelConfig) -> str:
    """The HF architecture that can hold ``cfg`` exactly, or a ConversionError naming what does not fit."""
    if set(cfg.attention_types) & MAMBA_TYPES:
        return hf_mamba.architecture_for(cfg)
    if cfg.moe_num_experts > 1:
        return hf_moe.architecture_for(cfg)
    if cfg.norm_placement == "olmo3":
        return "olmo3"
    if cfg.norm == "layernorm":
        return "gpt_neox"
    return "llama"


def _require(cfg: ModelConfig, arch: str, checks: dict[str, bool]) -> None:
    bad = [what for what, ok in checks.items() if not ok]
    if bad:
        raise ConversionError(
            f"model config cannot be expressed as {HF_CLASS[arch]}: {'; '.join(bad)}"
        )


def hf_config_from_model_config(cfg: ModelConfig, arch: str | None = None, **extra: Any):
    """A transformers config object equivalent to ``cfg`` (``extra``: token ids, dtype...)."""
    from transformers import GPTNeoXConfig, LlamaConfig

    arch = arch or architecture_for(cfg)
    if arch in hf_mamba.ARCHITECTURES.values():
        return hf_mamba.hf_config_from_model_config(cfg, arch, **extra)
    common = dict(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.use_bias_in_attn_linear,
        attention_dropout=cfg.attention_dropout,
        initializer_range=cfg.init_method_std,
        architectures=[hf_class_for(cfg, arch)],
    )
    if cfg.value_head:
        common.update(num_labels=1, tie_word_embeddings=False)
    rope = _hf_rope_parameters(cfg)
    checks = {
        "pos_emb must be 'rotary'": cfg.pos_emb == "rotary",
        "use_qk_layernorm is not supported": not cfg.use_qk_layernorm,
        "use_head_qk_norms is supported for Qwen3-MoE only": not cfg.use_head_qk_norms or cfg.moe_num_experts > 1,
        "moe_num_experts > 1 needs an MoE architecture": cfg.moe_num_experts == 1 or arch in hf_moe.ARCHITECTURES.values(),
    }
    if arch == "gpt_neox":
        _require(cfg, arch, {
            **checks,
            "norm must be layernorm with bias": cfg.norm == "layernorm" and cfg.use_bias_in_norms,
            "norm_placement must be 'pre'": cfg.norm_placement == "pre",
            "gpt_j_tied is not supported": not (cfg.gpt_j_residual and cfg.gpt_j_tied),
            "activation must be gelu": cfg.activation == "gelu",
            "use_bias_in_mlp must be true": cfg.use_bias_in_mlp,
            "num_kv_heads must equal num_attention_heads": cfg.num_kv_heads == cfg.num_attention_heads,
            "all layers must be global attention": set(cfg.attention_types) == {"global"},
            "use_separate_qk_norms is not supported": not cfg.use_separate_qk_norms,
            "rotary_pct must give int(head_dim * rotary_pct) even": cfg.rotary_dim == int(cfg.head_dim * cfg.rotary_pct),
        })
        rope["partial_rotary_factor"] = float(cfg.rotary_pct)
        return GPTNeoXConfig(
            **common, hidden_act="gelu", layer_norm_eps=cfg.layernorm_epsilon,
            use_parallel_residual=cfg.gpt_j_residual, hidden_dropout=cfg.hidden_dropout,
            rope_parameters=rope, **extra,
        )
    gated_checks = {
        **checks,
        "norm must be rmsnorm": cfg.norm == "rmsnorm",
        "activation must be swiglu, geglu or reglu": cfg.activation in _HF_ACT,
        "rotary_pct must be 1.0": cfg.rotary_dim == cfg.head_dim,
        "gpt_j_residual is not supported": not cfg.gpt_j_residual,
    }
    common.update(num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_epsilon,
                  hidden_act=_HF_ACT.get(cfg.activation, "silu"))
    if arch in hf_moe.ARCHITECTURES.values():
        return hf_moe.hf_config(cfg, arch, common, gated_checks, rope, extra)
    if arch == "llama":
        _require(cfg, arch, {
            **gated_checks,
            "norm_placement must be 'pre'": cfg.norm_placement == "pre",
            "all layers must be global attention": set(cfg.attention_types) == {"global"},
            "use_separate_qk_norms is not supported": not cfg.use_separate_qk_norms,
        })
        return LlamaConfig(**common, mlp_bias=cfg.use_bias_in_mlp, head_dim=cfg.head_dim,
                           rope_parameters=rope, **extra)
    _require(cfg, arch, {
        **gated_checks,
        "norm_placement must be 'olmo3'": cfg.norm_placement == "olmo3",
        "use_separate_qk_norms must be true": cfg.use_separate_qk_norms,
        "use_bias_in_mlp must be false": not cfg.use_bias_in_mlp,
    })
    return _olmo3_hf_config(cfg, common, rope, extra)


def _olmo3_hf_config(cfg: ModelConfig, common: dict[str, Any], rope: dict[str, Any], extra: dict[str, Any]):
    """OLMo-3's config: per-layer attention types, and rope_parameters per type (plain RoPE on
    sliding layers unless ``rope_scaling_layers`` scales them too)."""
    from transformers import Olmo3Config

    from neoxt.model.rope import is_scaled

    layer_types = ["sliding_attention" if t == "sliding" else "full_attention" for t in cfg.attention_types]
    plain = {"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base)}
    sliding = dict(rope) if is_scaled(cfg, "sliding") else plain
    return Olmo3Config(
        **common, layer_types=layer_types, sliding_window=cfg.sliding_window_width or 4096,
        rope_parameters={"sliding_attention": sliding, "full_attention": dict(rope)}, **extra,
    )


# ----------------------------------------------------------------------------------------------
# Weights


def _renames(cfg: ModelConfig, arch: str) -> Iterator[tuple[str, str]]:
    """(hf_name, our_name) for every tensor that maps one to one (GPTNeoX's fused QKV excluded)."""
    if arch in hf_moe.ARCHITECTURES.values():
        yield from hf_moe.renames(cfg, arch)
        return
    if arch in hf_mamba.ARCHITECTURES.values():
        yield from hf_mamba.renames(cfg)
        return
    if arch == "gpt_neox":
        p = "gpt_neox."
        yield p + "embed_in.weight", "embed.weight"
        parts = {
            "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
            "attention.dense": "attn.o", "mlp.dense_h_to_4h": "mlp.up", "mlp.dense_4h_to_h": "mlp.down",
        }
        final = p + "final_layer_norm"
        layer = p + "layers.{i}."
    else:
        parts = {
            "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
            "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
            "mlp.down_proj": "mlp.down",
        }
        if arch == "olmo3":
            parts.update({"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
                          "post_attention_layernorm": "attn_norm", "post_feedforward_layernorm": "mlp_norm"})
        else:
            parts.update({"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"})
        yield "model.embed_tokens.weight", "embed.weight"
        final = "model.norm"
        layer = "model.layers.{i}."
    for i in range(cfg.num_layers):
        for hf_part, our_part in parts.items():
            for leaf in ("weight", "bias"):
                yield layer.format(i=i) + f"{hf_part}.{leaf}", f"layers.{i}.{our_part}.{leaf}"
    for leaf in ("weight", "bias"):
        yield f"{final}.{leaf}", f"final_norm.{leaf}"
    yield ("score.weight" if cfg.value_head else "lm_head.weight"), "lm_head.weight"


def _check_shape(name: str, tensor: torch.Tensor, shape: torch.Size, source: str, hf_name: str) -> None:
    if tensor.shape != shape:
        raise ConversionError(
            f"{source}: tensor {hf_name} has shape {list(tensor.shape)}, expected {list(shape)} for this config"
        )


def hf_to_neoxt_state_dict(
    hf_sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    arch: str,
    source: str = "<state dict>",
    progress: Callable[[Iterator], Iterator] = iter,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """HF tensors → our names/layout. Every expected tensor must be present with the right shape and
    every HF tensor must be used (buffers of old GPTNeoX checkpoints excepted)."""
    shapes = parameter_shapes(cfg)
    hf_names = set(hf_sd.keys())
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def fetch(hf_name: str) -> torch.Tensor:
        if hf_name not in hf_names:
            raise ConversionError(f"{source}: missing tensor {hf_name}")
        used.add(hf_name)
        t = hf_sd[hf_name]
        return t if dtype is None else t.to(dtype)

    todo = [(h, o) for h, o in _renames(cfg, arch) if o in shapes]
    if arch == "gpt_neox" and not cfg.value_head and "lm_head.weight" in shapes and "lm_head.weight" not in hf_names:
        todo = [("embed_out.weight" if o == "lm_head.weight" else h, o) for h, o in todo]  # Pythia-era name
    fused = [(f"gpt_neox.layers.{i}.attention.query_key_value.{leaf}", i, leaf)
             for i in range(cfg.num_layers) for leaf in ("weight", "bias")
             if f"layers.{i}.attn.q.{leaf}" in shapes] if arch == "gpt_neox" else []

    for hf_name, ours in progress(todo):
        t = fetch(hf_name)
        _check_shape(ours, t, shapes[ours], source, hf_name)
        out[ours] = t
    for ours, names in hf_moe.stacked(cfg, arch):  # per-expert tensors → our [E, ...] stacks
        out[ours] = torch.stack([fetch(n) for n in names])
        _check_shape(ours, out[ours], shapes[ours], source, names[0].replace(".experts.0.", ".experts.*."))
    heads, hd = cfg.num_attention_heads, cfg.head_dim
    for hf_name, i, leaf in fused:
        t = fetch(hf_name)
        want = (3 * heads * hd, cfg.hidden_size) if leaf == "weight" else (3 * heads * hd,)
        _check_shape(hf_name, t, torch.Size(want), source, hf_name)
        per_head = t.reshape(heads, 3, hd, *t.shape[1:])
        for j, proj in enumerate("qkv"):
            out[f"layers.{i}.attn.{proj}.{leaf}"] = per_head[:, j].reshape(heads * hd, *t.shape[1:]).clone()

    if cfg.tie_word_embeddings and "lm_head.weight" in hf_names:
        used.add("lm_head.weight")  # saved tied copy; we read the embedding
    extra = sorted(n for n in hf_names - used if not _IGNORABLE.search(n))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(f"{source}: unexpected tensor {extra[0]}{more} for this {HF_CLASS[arch]} config")
    missing = sorted(set(shapes) - set(out))
    if missing:  # our mapping is incomplete: a bug, not a user error
        raise AssertionError(f"hf→neoxt mapping left {missing} unset")
    return out


def neoxt_to_hf_state_dict(
    sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    arch: str,
    progress: Callable[[Iterator], Iterator] = iter,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Our tensors → HF names/layout (the exact inverse of ``hf_to_neoxt_state_dict``)."""
    shapes = parameter_shapes(cfg)
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise ConversionError(f"checkpoint is missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in shapes.items():
        if sd[name].shape != shape:
            raise ConversionError(f"checkpoint tensor {name} has shape {list(sd[name].shape)}, expected {list(shape)}")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None else t.to(dtype)

    out: dict[str, torch.Tensor] = {}
    for hf_name, ours in progress([(h, o) for h, o in _renames(cfg, arch) if o in shapes]):
        if arch == "gpt_neox" and hf_name == "lm_head.weight":
            # GPTNeoXForCausalLM's own attribute: transformers 4.x loads only this name (it would
            # re-initialise a missing embed_out), 5.x renames it to lm_head on load.
            hf_name = "embed_out.weight"
        out[hf_name] = cast(sd[ours])
    for ours, names in hf_moe.stacked(cfg, arch):
        out.update(zip(names, (cast(t.clone()) for t in sd[ours].unbind(0)), strict=True))
    if arch == "gpt_neox":
        heads, hd = cfg.num_attention_heads, cfg.head_dim
        for i in range(cfg.num_layers):
            for leaf in ("weight", "bias"):
                if f"layers.{i}.attn.q.{leaf}" not in shapes:
                    continue
                parts = [sd[f"layers.{i}.attn.{p}.{leaf}"] for p in "qkv"]
                rest = parts[0].shape[1:]
                fused = torch.stack([p.reshape(heads, hd, *rest) for p in parts], dim=1)
                out[f"gpt_neox.layers.{i}.attention.query_key_value.{leaf}"] = cast(fused.reshape(3 * heads * hd, *rest))
    return out
