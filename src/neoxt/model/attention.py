"""Causal self-attention: projections, optional Q/K norms, rotary, and the attention kernel.

Masks are boolean (True = may attend) over *slots*: query slot ``i`` of this call sits at cache slot
``offset + i`` where ``offset`` is the number of already cached positions. A key slot ``j`` is visible
when it is causal (``j <= offset + i``), inside the sliding window when the layer has one
(``offset + i - j < window``, i.e. the token itself and the ``window - 1`` before it, as transformers'
sliding-window layers do), a real token per ``key_padding_mask``, and allowed by an extra
``attn_mask`` (document boundaries). Each query may always see its own slot, so left-padding rows
never produce an all-masked softmax (NaN) that could leak into the cache.

Kernels: ``F.scaled_dot_product_attention`` everywhere (its fused causal path when no explicit mask
is needed); on CUDA, sliding-window layers without cache or padding use ``flex_attention`` with a
block mask, which skips the fully masked blocks that SDPA would still compute. On CPU, torch 2.13's
flex_attention is forward-only, so it is used there only when asked for (tests compare the two).

Context parallelism (``neoxt.distributed.context_parallel``) gives a layer ``context_parallel``, an
object whose ``attend(q, k, v, mask)`` attends this rank's share of the queries to the whole
sequence; the mask is then built over sequence *positions* (``slots``) rather than local indices,
and ``None`` still means "causal and nothing else".
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from neoxt.config.schema import ModelConfig
from neoxt.errors import ConfigError
from neoxt.model.fused import fused_linears
from neoxt.model.kv_cache import KVCache
from neoxt.model.norms import make_norm
from neoxt.model.rope import apply_rope


def build_mask(
    q_len: int,
    kv_len: int,
    window: int | None,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    device: torch.device,
    slots: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, q_len, kv_len], or None when plain causal attention without offset suffices.

    ``slots``: (sequence position of each query, of each key) when they are not ``offset + i`` and
    ``j`` (a context-parallel rank's share of the sequence; no cache)."""
    offset = kv_len - q_len
    if window is None and key_padding_mask is None and attn_mask is None:
        if offset == 0 or slots is not None:
            return None  # SDPA's is_causal path (the ring under context parallelism)
        if q_len == 1:
            return None  # one new token sees the whole cache
    if slots is None:
        q_slot = torch.arange(q_len, device=device)[:, None] + offset
        k_slot = torch.arange(kv_len, device=device)[None, :]
    else:
        q_slot, k_slot = slots[0][:, None], slots[1][None, :]
    mask = k_slot <= q_slot
    if window is not None:
        mask = mask & (q_slot - k_slot < window)
    mask = mask[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    if attn_mask is not None:
        mask = mask & attn_mask.to(device=device, dtype=torch.bool)
    return mask | (k_slot == q_slot)[None, None]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, KV, S, D] (KV divides H) → [B, H, T, D]."""
    gqa = k.shape[1] != q.shape[1]
    causal = mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa
    )


@functools.lru_cache(maxsize=32)
def _sliding_block_mask(window: int, q_len: int, kv_len: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = kv_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        q_slot = q_idx + offset
        return (kv_idx <= q_slot) & (q_slot - kv_idx < window)

    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_sliding_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window attention via flex_attention (compiled on CUDA, eager elsewhere)."""
    block_mask = _sliding_block_mask(window, q.shape[2], k.shape[2], str(q.device))
    kernel = _flex_kernel(q.is_cuda)
    return kernel(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    """Multi-head / grouped-query attention with separate q, k, v, o parameters (q/k/v computed in one matmul)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_kv_heads
        bias = cfg.use_bias_in_attn_linear
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = heads, kv, hd
        self.q = nn.Linear(cfg.hidden_size, heads * hd, bias=bias)
        self.k = nn.Linear(cfg.hidden_size, kv * hd, bias=bias)
        self.v = nn.Linear(cfg.hidden_size, kv * hd, bias=bias)
        self.o = nn.Linear(heads * hd, cfg.hidden_size, bias=bias)
        # OLMo-2/3: one norm over the whole q projection and one over the whole k projection.
        self.q_norm = make_norm(cfg, heads * hd) if cfg.use_separate_qk_norms else None
        self.k_norm = make_norm(cfg, kv * hd) if cfg.use_separate_qk_norms else None
        # GPT-NeoX use_qk_layernorm: one norm with a [heads, head_dim] gain shared by q and k.
        # LayerNorm reduces over all heads and dims, RMSNorm over head_dim (upstream's behaviour).
        self.qk_norm = make_norm(cfg, (heads, hd)) if cfg.use_qk_layernorm else None
        if cfg.use_head_qk_norms:  # Qwen3: per-head norms, applied after the head split below
            self.q_norm, self.k_norm = make_norm(cfg, hd), make_norm(cfg, hd)
        self.head_qk_norms = cfg.use_head_qk_norms
        sliding = cfg.attention_types[layer_idx] == "sliding"
        self.window = cfg.sliding_window_width if sliding else None
        self.dropout = cfg.attention_dropout
        self.backend = "auto"  # "auto" | "sdpa" | "flex"; see module docstring
        self.context_parallel = None  # set by neoxt.distributed.context_parallel; see module docstring

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        plain: bool = True,
    ) -> torch.Tensor:
        """``plain``: the mask holds only causality and the window (no padding or document mask)."""
        B, T, _ = x.shape
        q, k, v = fused_linears(x, self.q, self.k, self.v)
        if self.q_norm is not None and not self.head_qk_norms:
            q, k = self.q_norm(q), self.k_norm(k)
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = q.view(B, T, -1, self.head_dim)
        k = k.view(B, T, -1, self.head_dim)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        if self.head_qk_norms:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        dropout = self.dropout if self.training else 0.0
        if self.context_parallel is not None:
            out = self.context_parallel.attend(q, k, v, mask)
        elif self._use_flex(q, k, plain, dropout):
            out = flex_sliding_attention(q, k, v, self.window)
        else:
            out = sdpa_attention(q, k, v, mask, dropout)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))

    def _use_flex(self, q: torch.Tensor, k: torch.Tensor, plain: bool, dropout: float) -> bool:
        if self.window is None or not plain or self.backend == "sdpa" or dropout > 0.0:
            return False
        if self.backend == "flex":
            return True
        # auto: only where flex is trainable and skipping blocks pays off.
        return q.is_cuda and q.shape[2] == k.shape[2] and q.shape[2] > self.window


def check_attention_config(cfg: ModelConfig) -> None:
    """Reject attention settings the model cannot honour, naming the keys."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
        )
    if cfg.num_attention_heads % cfg.num_kv_heads:
        raise ConfigError(
            f"num_attention_heads {cfg.num_attention_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}"
        )
    if len(cfg.attention_types) != cfg.num_layers:
        raise ConfigError(
            f"attention_types has {len(cfg.attention_types)} entries but num_layers is {cfg.num_layers}"
        )
    if "sliding" in cfg.attention_types and not cfg.sliding_window_width:
        raise ConfigError("attention_types has 'sliding' layers but sliding_window_width is not set")
    if sum((cfg.use_qk_layernorm, cfg.use_separate_qk_norms, cfg.use_head_qk_norms)) > 1:
        raise ConfigError("use_qk_layernorm, use_separate_qk_norms and use_head_qk_norms are mutually exclusive")
    if cfg.use_qk_layernorm and cfg.num_kv_heads != cfg.num_attention_heads:
        raise ConfigError("use_qk_layernorm shares one [heads, head_dim] norm between q and k; "
                          "it needs num_kv_heads == num_attention_heads")
    if cfg.pos_emb == "rotary" and cfg.rotary_dim == 0:
        raise ConfigError(f"rotary_pct {cfg.rotary_pct} leaves no rotary dimensions (head_dim {cfg.head_dim})")


__all__ = ["Attention", "build_mask", "check_attention_config", "flex_sliding_attention", "sdpa_attention"]
