"""Hugging Face ↔ neoxt: config and weight mappings for GPTNeoX, LLaMA and OLMo-3.

Pure functions (no file I/O beyond what the caller hands in):

- ``detect_architecture(config_json, source)`` → ``"gpt_neox" | "llama" | "olmo3"``
- ``model_config_from_hf(hf_config)`` → our ``ModelConfig`` (reads transformers' normalised config
  object, so both the transformers-4 form of config.json — ``rope_theta``, ``rotary_pct``,
  ``rotary_emb_base``, ``rope_scaling`` — and the transformers-5 ``rope_parameters`` form, per layer
  type for OLMo-3, are understood). RoPE scaling (linear, llama3, YaRN) maps onto the
  ``rope_scaling_*`` fields; OLMo-3's YaRN on full-attention layers only is
  ``rope_scaling_layers: global``, and ``hf_config_from_model_config`` writes the same dicts back.
- ``hf_config_from_model_config(cfg, arch)`` → a transformers config object.
- ``hf_to_neoxt_state_dict`` / ``neoxt_to_hf_state_dict`` → renamed, re-laid-out tensors, exact
  (no arithmetic on values, so a round trip is bit-identical).

At the bottom, ``convert_hf_to_neoxt`` / ``convert_neoxt_to_hf`` do the directory-level work the
``neoxt convert`` commands call: everything is written under a hidden temporary directory beside the
output and renamed into place only when complete, so a failure leaves nothing at the output path.

Layout traps handled here: HF GPTNeoX fuses Q, K, V into ``query_key_value`` interleaved *per head*
(output rows viewed as ``[heads, 3, head_dim]``); OLMo-3's ``q_norm``/``k_norm`` span the whole
projection (``heads * head_dim`` and ``kv_heads * head_dim``), not one head; OLMo-3's two norms sit
*after* attention and MLP (our ``attn_norm``/``mlp_norm`` with ``norm_placement: olmo3``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from neoxt.config.schema import MAMBA_TYPES, ModelConfig, TokenizerConfig
from neoxt.errors import ConversionError
from neoxt.model import hf_mamba  # MambaForCausalLM / Mamba2ForCausalLM: config translation and names

ARCHITECTURES = {
    "GPTNeoXForCausalLM": "gpt_neox",
    "LlamaForCausalLM": "llama",
    "Olmo3ForCausalLM": "olmo3",
    **hf_mamba.ARCHITECTURES,
}
HF_CLASS = {arch: cls for cls, arch in ARCHITECTURES.items()}

# Tensors older HF GPTNeoX checkpoints carry that are buffers, not weights.
_IGNORABLE = re.compile(r"(^|\.)(attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")

_GATED_ACT = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}
_HF_ACT = {v: k for k, v in _GATED_ACT.items()}


def detect_architecture(config_json: Mapping[str, Any], source: str) -> str:
    """Our architecture key for an HF config.json, from ``architectures`` (else ``model_type``)."""
    names = list(config_json.get("architectures") or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
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
    cls = {"gpt_neox": GPTNeoXConfig, "llama": LlamaConfig, "olmo3": Olmo3Config}[arch]
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
        use_bias_in_attn_linear=bool(hf.attention_bias),
    )
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
    from transformers import GPTNeoXConfig, LlamaConfig, Olmo3Config

    from neoxt.model.rope import is_scaled

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
        architectures=[HF_CLASS[arch]],
    )
    rope = _hf_rope_parameters(cfg)
    checks = {
        "pos_emb must be 'rotary'": cfg.pos_emb == "rotary",
        "use_qk_layernorm is not supported": not cfg.use_qk_layernorm,
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
    yield "lm_head.weight", "lm_head.weight"


@functools.lru_cache(maxsize=8)
def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes for ``cfg`` (built on the meta device: no memory, no init cost)."""
    from neoxt.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: t.shape for name, t in model.state_dict().items()}


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
    shapes = expected_shapes(cfg)
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
    if arch == "gpt_neox" and "lm_head.weight" in shapes and "lm_head.weight" not in hf_names:
        todo = [("embed_out.weight" if o == "lm_head.weight" else h, o) for h, o in todo]  # Pythia-era name
    fused = [(f"gpt_neox.layers.{i}.attention.query_key_value.{leaf}", i, leaf)
             for i in range(cfg.num_layers) for leaf in ("weight", "bias")
             if f"layers.{i}.attn.q.{leaf}" in shapes] if arch == "gpt_neox" else []

    for hf_name, ours in progress(todo):
        t = fetch(hf_name)
        _check_shape(ours, t, shapes[ours], source, hf_name)
        out[ours] = t
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
    shapes = expected_shapes(cfg)
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
        out[hf_name] = cast(sd[ours])
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


# ----------------------------------------------------------------------------------------------
# Directories (what `neoxt convert hf-to-neoxt` / `neoxt-to-hf` do)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
)


def progress(desc: str) -> Callable[[Iterable], Iterator]:
    """Wrap an iterable of tensors: tqdm on a TTY, else a one-line log every 10 s and at the end."""

    def wrap(items: Iterable) -> Iterator:
        items = list(items)
        if sys.stderr.isatty():
            from tqdm import tqdm

            yield from tqdm(items, desc=desc, unit="tensor")
            return
        last = time.monotonic()
        for i, item in enumerate(items, 1):
            yield item
            if time.monotonic() - last >= 10 or i == len(items):
                print(f"{desc}: {i}/{len(items)} tensors", file=sys.stderr, flush=True)
                last = time.monotonic()

    return wrap


def temp_dir_beside(out: Path) -> Path:
    """A fresh hidden directory next to ``out`` (same filesystem, so the final rename is atomic)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: output path already exists and is not empty; remove it or pick another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Give ``tmp``'s files the usual permissions and rename it to ``out`` (empty or absent)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.rglob("*"):  # safetensors writes 0600 files; give them the usual permissions
        if f.is_file():
            f.chmod(0o666 & ~umask)
    tmp.chmod(0o777 & ~umask)
    if out.is_dir():
        out.rmdir()  # empty (checked in _temp_beside)
    os.replace(tmp, out)


def read_chat_template(value: str | None) -> str | None:
    """The template text for a TokenizerConfig.chat_template (inline Jinja text or a file path)."""
    if not value:
        return None
    if "{%" in value or "{{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConversionError(f"chat_template: {value} is neither a Jinja template nor an existing file")
    return path.read_text(encoding="utf-8")


def _hf_chat_template(hf_dir: Path) -> str | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg_path = hf_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        template = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


def _copy_tokenizer(hf_dir: Path, tmp_tok: Path, final_tok: Path) -> TokenizerConfig:
    """Copy the HF tokenizer files; return the tokenizer config pointing at their final place."""
    present = [f for f in _TOKENIZER_FILES if (hf_dir / f).is_file()]
    if not present:
        print(f"neoxt: warning: {hf_dir} has no tokenizer files; the config has no vocab_file", file=sys.stderr)
        return TokenizerConfig(tokenizer_type="HFTokenizer")
    tmp_tok.mkdir()
    for name in present:
        shutil.copy2(hf_dir / name, tmp_tok / name)
    template = _hf_chat_template(hf_dir)
    if template is not None and not (tmp_tok / "chat_template.jinja").is_file():
        (tmp_tok / "chat_template.jinja").write_text(template, encoding="utf-8")
    chat = str(final_tok / "chat_template.jinja") if template is not None else None
    if "tokenizer.json" in present:
        return TokenizerConfig("HFTokenizer", str(final_tok / "tokenizer.json"), None, chat)
    if "vocab.json" in present and "merges.txt" in present:
        return TokenizerConfig("GPT2BPETokenizer", str(final_tok / "vocab.json"), str(final_tok / "merges.txt"), chat)
    if "tokenizer.model" in present:
        return TokenizerConfig("SPMTokenizer", str(final_tok / "tokenizer.model"), None, chat)
    return TokenizerConfig("HFTokenizer", None, None, chat)


# What a conversion needs from a Hub repository (weights in safetensors, else PyTorch pickles).
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja"]


def resolve_hf_source(source: str | os.PathLike) -> Path:
    """A local HF model directory as is; an ``org/name`` Hub id downloaded into the HF cache first
    (with ``HF_HUB_OFFLINE=1``: the cached snapshot only)."""
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise ConversionError(f"{source}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(text, allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
    except Exception as err:  # the hub client raises many types (offline, 404, auth, network)
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConversionError(f"{source}: not a local directory and not downloadable from the Hub "
                              f"({type(err).__name__}: {first})") from None
    return local


def convert_hf_to_neoxt(
    hf_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: str | None = None, iteration: int = 0
) -> Path:
    """HF model directory (or Hub id) → neoxt run directory (checkpoint, config.yml, tokenizer/).

    Returns the checkpoint (step) directory.
    """
    from neoxt.config import config_to_yaml
    from neoxt.config.schema import DataConfig, RunConfig, TrainingConfig
    from neoxt.convert.loading import read_hf_model
    from neoxt.train.checkpoint import save_checkpoint, step_dir_name

    hf_dir, out = resolve_hf_source(hf_dir), Path(output_dir).absolute()
    torch_dtype = DTYPES[dtype] if dtype else None
    tmp = temp_dir_beside(out)
    try:
        cfg, sd, arch, _ = read_hf_model(hf_dir, torch_dtype, progress(f"hf-to-neoxt {hf_dir.name}"))
        tokenizer = _copy_tokenizer(hf_dir, tmp / "tokenizer", out / "tokenizer")
        precision = _PRECISION.get(sd["embed.weight"].dtype, "fp32")
        run_cfg = RunConfig(
            model=cfg,
            tokenizer=tokenizer,
            data=DataConfig(seq_length=min(2048, cfg.max_position_embeddings)),
            training=TrainingConfig(precision=precision),
        )
        text = config_to_yaml(run_cfg)
        meta = {"source": str(hf_dir.absolute()), "hf_architecture": HF_CLASS[arch], "consumed_tokens": 0,
                "consumed_samples": 0}
        save_checkpoint(tmp, iteration, {"model": sd}, text, meta=meta)
        (tmp / "config.yml").write_text(text, encoding="utf-8")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / step_dir_name(iteration)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' → bytes (decimal units as transformers' max_shard_size)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in units:
        raise ConversionError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB or 500MB)")
    return int(float(m.group(1)) * units[m.group(2)])


def write_safetensors(sd: Mapping[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[Path]:
    """HF-style (sharded) safetensors: model.safetensors, or model-0000i-of-0000n + index json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        path = out_dir / "model.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths


def _load_tokenizer(tok: TokenizerConfig):
    """A transformers tokenizer for our tokenizer config, or None when it cannot be exported."""
    from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

    if not tok.vocab_file:
        return None
    vocab = Path(tok.vocab_file)
    if not vocab.is_file():
        raise ConversionError(f"tokenizer vocab_file {vocab} (from the checkpoint's config.yml) does not exist")
    if tok.tokenizer_type == "HFTokenizer":
        if (vocab.parent / "tokenizer_config.json").is_file() and vocab.name == "tokenizer.json":
            return AutoTokenizer.from_pretrained(str(vocab.parent))
        return PreTrainedTokenizerFast(tokenizer_file=str(vocab))
    if tok.tokenizer_type in ("GPT2BPETokenizer", "HFGPT2Tokenizer") and tok.merge_file:
        return GPT2TokenizerFast(vocab_file=str(vocab), merges_file=str(tok.merge_file))
    print(f"neoxt: warning: tokenizer_type {tok.tokenizer_type} is not exported; add tokenizer files by hand",
          file=sys.stderr)
    return None


def convert_neoxt_to_hf(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, dtype: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """neoxt run dir or ``global_step<N>`` dir → HF model directory (safetensors, config, tokenizer)."""
    from neoxt.convert.loading import read_checkpoint_config, read_checkpoint_model_state
    from neoxt.train.checkpoint import resolve_checkpoint

    out = Path(output_dir).absolute()
    ckpt = resolve_checkpoint(checkpoint)
    run_cfg = read_checkpoint_config(ckpt)
    cfg = run_cfg.model
    arch = architecture_for(cfg)
    max_bytes = parse_size(max_shard_size)
    tokenizer = _load_tokenizer(run_cfg.tokenizer)
    template = read_chat_template(run_cfg.tokenizer.chat_template)
    if tokenizer is not None and template is not None:
        tokenizer.chat_template = template
    ids = {}
    if tokenizer is not None:
        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tokenizer, k, None) is not None}
    hf_cfg = hf_config_from_model_config(cfg, arch, **ids)  # fails on unexpressible configs before any I/O
    tmp = temp_dir_beside(out)
    try:
        sd = read_checkpoint_model_state(ckpt, cfg)
        torch_dtype = DTYPES[dtype] if dtype else None
        hf_sd = neoxt_to_hf_state_dict(sd, cfg, arch, progress(f"neoxt-to-hf {ckpt.name}"), torch_dtype)
        hf_cfg.dtype = str(next(iter(hf_sd.values())).dtype).removeprefix("torch.")
        write_safetensors(hf_sd, tmp, max_bytes)
        hf_cfg.save_pretrained(str(tmp))
        _write_generation_config(tmp, ids)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_generation_config(out_dir: Path, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**ids).save_pretrained(str(out_dir))
