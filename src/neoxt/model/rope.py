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

import torch

from neoxt.config.schema import ModelConfig


def inv_frequencies(rotary_dim: int, base: float) -> torch.Tensor:
    """1 / base^(2i/d) for i < d/2, in fp32 (the formula every RoPE checkpoint was trained with)."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


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
