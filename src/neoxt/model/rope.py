"""Rotary position embeddings, GPT-NeoX ("rotate_half") style.

The first ``rotary_dim`` dimensions of every query/key head are rotated; the rest pass through
unchanged (GPT-NeoX's ``rotary_pct``). Within the rotated part, dimension ``i`` is paired with
``i + rotary_dim/2`` — the layout GPT-NeoX, HF GPTNeoX, LLaMA and OLMo checkpoints all use, so no
weight permutation is needed on conversion.

Angles are computed in fp32 exactly as transformers does (``positions.float() * inv_freq``), so our
logits match HF's bit for bit in the rotary part even at large positions. GPT-NeoX and LLaMA round
cos/sin to the activation dtype before rotating; OLMo-3 rotates in fp32 and rounds the result
(``rope_tables`` picks the convention from the config, so bf16 logits match transformers' too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from neoxt.config.schema import ModelConfig


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


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, rotary_dim] for integer positions [B, T]."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_tables(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, rotary_dim] for ``cfg`` at integer positions [B, T], for activations of ``dtype``."""
    table_dtype = torch.float32 if cfg.norm_placement == "olmo3" else dtype
    return rope_cos_sin(positions, inv_frequencies(cfg.rotary_dim, cfg.rotary_emb_base), table_dtype)


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
