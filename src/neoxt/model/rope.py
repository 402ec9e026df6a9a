"""Rotary position embeddings, GPT-NeoX ("rotate_half") style.

The first ``rotary_dim`` dimensions of every query/key head are rotated; the rest pass through
unchanged (GPT-NeoX's ``rotary_pct``). Within the rotated part, dimension ``i`` is paired with
``i + rotary_dim/2`` — the layout GPT-NeoX, HF GPTNeoX, LLaMA and OLMo checkpoints all use, so no
weight permutation is needed on conversion.

Angles are computed in fp32 exactly as transformers does (``positions.float() * inv_freq``), so our
logits match HF's bit for bit in the rotary part even at large positions. GPT-NeoX and LLaMA round
cos/sin to the activation dtype before rotating; OLMo-3 rotates in fp32 and rounds the result
(``rope_tables`` picks the convention from the config, so bf16 logits match transformers' too).

Long-context scaling (``rope_scaling_type``: linear, llama3, YaRN) changes the inverse frequencies
and, for YaRN, multiplies cos/sin by an attention factor — in fp32, before any rounding, as
transformers does. It applies to every layer, or (``rope_scaling_layers: global``, OLMo-3) only to
full-attention layers while sliding-window layers keep plain RoPE, so ``rope_tables`` returns one
cos/sin pair per attention type.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from neoxt.config.schema import ModelConfig
from neoxt.errors import ConfigError


def inv_frequencies(rotary_dim: int, base: float) -> torch.Tensor:
    """1 / base^(2i/d) for i < d/2, in fp32 (the formula every RoPE checkpoint was trained with)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def scaled_inv_frequencies(
    rotary_dim: int, base: float, scaling: Mapping[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for HF-style RoPE scaling ``{"rope_type": "linear"|"llama3"|"yarn", ...}``.

    Formulas as transformers applies them (keys and defaults of its ``rope_parameters``):
    linear divides every frequency by ``factor``; llama3 divides the low frequencies (wavelength
    above ``original_max_position_embeddings / low_freq_factor``) by ``factor`` and interpolates
    smoothly up to ``/ high_freq_factor``; YaRN blends interpolated and original frequencies with a
    linear ramp over the dimensions between the ``beta_fast`` and ``beta_slow`` rotation counts and
    scales cos/sin by ``attention_factor`` (default ``0.1 ln(factor) + 1``). OLMo-3's long-context
    checkpoints use YaRN on their full-attention layers, LLaMA-3.1+ use llama3.
    """
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    inv_freq = inv_frequencies(rotary_dim, base)
    if kind == "default":
        return inv_freq, 1.0
    factor = scaling.get("factor")
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        original = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(rotary_dim, base, scaling, max_position_embeddings)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3, yarn)")


def _yarn(dim: int, base: float, p: Mapping[str, Any], max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (extrapolate), 0: interpolate
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention)


def scaling_parameters(cfg: ModelConfig) -> dict[str, Any] | None:
    """``cfg``'s RoPE scaling as transformers' ``rope_parameters`` keys (without rope_theta), or None."""
    kind = cfg.rope_scaling_type
    if kind == "none":
        return None
    params: dict[str, Any] = {"rope_type": kind, "factor": float(cfg.rope_scaling_factor)}
    if kind == "linear":
        return params
    params["original_max_position_embeddings"] = (
        cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
    )
    if kind == "llama3":
        params.update(low_freq_factor=float(cfg.rope_low_freq_factor), high_freq_factor=float(cfg.rope_high_freq_factor))
        return params
    params.update(beta_fast=float(cfg.rope_beta_fast), beta_slow=float(cfg.rope_beta_slow))
    if cfg.rope_attention_factor is not None:
        params["attention_factor"] = float(cfg.rope_attention_factor)
    return params


def is_scaled(cfg: ModelConfig, attention_type: str) -> bool:
    """Whether layers of ``attention_type`` ("global" | "sliding") use the scaled frequencies."""
    if cfg.rope_scaling_type == "none":
        return False
    return cfg.rope_scaling_layers == "all" or attention_type == "global"


def check_rope_config(cfg: ModelConfig) -> None:
    """Reject RoPE scaling settings that would divide by zero or silently do nothing, naming the key."""
    kind = cfg.rope_scaling_type
    if kind == "none":
        return
    if cfg.pos_emb != "rotary":
        raise ConfigError(f"rope_scaling_type {kind!r} needs pos_emb 'rotary', got {cfg.pos_emb!r}")
    if not cfg.rope_scaling_factor > 0:
        raise ConfigError(f"rope_scaling_factor must be positive, got {cfg.rope_scaling_factor}")
    original = cfg.rope_original_max_position_embeddings
    if original is not None and original <= 0:
        raise ConfigError(f"rope_original_max_position_embeddings must be positive, got {original}")
    if kind == "llama3" and cfg.rope_low_freq_factor == cfg.rope_high_freq_factor:
        raise ConfigError("rope_low_freq_factor and rope_high_freq_factor must differ for llama3 scaling "
                          f"(both {cfg.rope_low_freq_factor})")


def _frequencies(cfg: ModelConfig, scaled: bool) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention factor) for plain or scaled layers (a few dozen values: not worth caching)."""
    if not scaled:
        return inv_frequencies(cfg.rotary_dim, cfg.rotary_emb_base), 1.0
    return scaled_inv_frequencies(
        cfg.rotary_dim, cfg.rotary_emb_base, scaling_parameters(cfg), cfg.max_position_embeddings
    )


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, rotary_dim] for integer positions [B, T], times ``attention_scaling`` in fp32."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    if attention_scaling == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rope_tables(
    cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Attention type ("global" | "sliding") → cos/sin [B, T, rotary_dim] at integer positions [B, T].

    Layer ``i`` rotates with ``rope_tables(...)[cfg.attention_types[i]]``; types that share the same
    frequencies share one pair of tensors. ``dtype`` is the activations' dtype.
    """
    table_dtype = torch.float32 if cfg.norm_placement == "olmo3" else dtype
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    by_scaling: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    for kind in dict.fromkeys(cfg.attention_types):
        scaled = is_scaled(cfg, kind)
        if scaled not in by_scaling:
            inv_freq, attention_scaling = _frequencies(cfg, scaled)
            by_scaling[scaled] = rope_cos_sin(positions, inv_freq, table_dtype, attention_scaling)
        out[kind] = by_scaling[scaled]
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, heads, T, head_dim] by cos/sin [B, T, rotary_dim].

    The rotation runs in the wider of the two dtypes and the result has x's dtype.
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    if rotary_dim == x.shape[-1]:
        return (x * cos + _rotate_half(x) * sin).to(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat(((x_rot * cos + _rotate_half(x_rot) * sin).to(x.dtype), x_pass), dim=-1)
