"""Parameter and FLOP counts from a ``ModelConfig`` alone (no model needed), for MFU and logs.

FLOPs per token (training: forward + backward = 3 x forward, 2 FLOPs per multiply-add):

    flops_per_token = 6 * N_matmul + 12 * sum_over_layers(ctx_l) * heads * head_dim

where ``N_matmul`` is every weight used in a matmul (all non-embedding parameters plus the output
head, which counts even when tied to the embedding; the embedding lookup itself is free) and the
second term is the attention scores (QK^T) and the weighted sum (AV), each 2 * ctx * heads * head_dim
per token forward. ``ctx_l`` is ``seq_len`` for global layers and ``min(seq_len, window)`` for
sliding-window layers. For mixture-of-experts layers ``N_matmul`` counts the *active* weights: the
router, ``moe_top_k`` experts and the shared experts (a token never touches the other experts), so
MFU stays honest; ``num_params`` counts every expert. This is the PaLM-appendix convention (no causal halving), the one MFU
figures in GPT-NeoX, Megatron and torchtitan logs use, so our MFU is comparable to theirs.

Mamba layers have no attention term; their projections and depthwise conv are in ``N_matmul`` and
the scan adds, per token and layer, 3x its forward FLOPs:

- Mamba-1 selective scan: ``9 * d_inner * d_state`` (discretise, update, read out; the count
  ``mamba_ssm`` uses for its kernel);
- Mamba-2 SSD in chunks of ``Q = min(mamba_chunk_size, seq_len)``, per head:
  ``2 Q (d_state + headdim)`` inside the chunk (C·B scores, applied to x) + ``4 headdim d_state``
  (the chunk state and its read-out).
"""

from __future__ import annotations

from neoxt.config.schema import MAMBA_TYPES, ModelConfig


def _vocab(cfg: ModelConfig) -> int:
    if cfg.padded_vocab_size is None:
        raise ValueError("ModelConfig.padded_vocab_size is not set (the tokenizer decides it)")
    return cfg.padded_vocab_size


def _norm_params(cfg: ModelConfig, width: int) -> int:
    has_bias = cfg.norm == "layernorm" and cfg.use_bias_in_norms
    return width * (2 if has_bias else 1)


def moe_mlp_params(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters of one MoE sublayer (router, experts, shared experts; no biases), or only those
    one token uses (``active``: top-k experts)."""
    per_expert = (3 if cfg.gated else 2) * cfg.hidden_size * cfg.moe_width
    experts = cfg.moe_top_k if active else cfg.moe_num_experts
    return cfg.hidden_size * cfg.moe_num_experts + (experts + cfg.moe_num_shared_experts) * per_expert


def mamba_layer_params(cfg: ModelConfig, kind: str) -> int:
    """Parameters of one Mamba block (``model/mamba.py``)."""
    H, inner, n, k = cfg.hidden_size, cfg.mamba_inner, cfg.mamba_d_state, cfg.mamba_d_conv
    bias = cfg.mamba_use_bias_in_linears
    if kind == "mamba":
        conv, rank = inner, cfg.mamba_rank
        proj = H * 2 * inner + (2 * inner if bias else 0) + inner * (rank + 2 * n) + rank * inner + inner
        ssm = inner * n + inner
    else:
        heads = inner // cfg.mamba_headdim
        conv = inner + 2 * cfg.mamba_ngroups * n
        width = inner + conv + heads
        proj = H * width + (width if bias else 0)
        ssm = 3 * heads + inner  # dt_bias, A_log, D, gated norm
    out = inner * H + (H if bias else 0)
    conv_params = conv * k + (conv if cfg.mamba_use_bias_in_conv else 0)
    return proj + conv_params + ssm + out + _norm_params(cfg, H)


def scan_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of one Mamba layer's scan (see the module docstring)."""
    inner, n = cfg.mamba_inner, cfg.mamba_d_state
    if kind == "mamba":
        return 9.0 * inner * n
    p = cfg.mamba_headdim
    q = min(cfg.mamba_chunk_size, seq_len)
    return (inner // p) * (2.0 * q * (n + p) + 4.0 * p * n)


def layer_params(cfg: ModelConfig, layer: int = 0, active: bool = False) -> int:
    """Parameters of block ``layer``: a Mamba block where ``attention_types`` says ``mamba``/``mamba2``,
    else a transformer block (``active``: an MoE layer counts its top-k experts only)."""
    kind = cfg.attention_types[layer]
    if kind in MAMBA_TYPES:
        return mamba_layer_params(cfg, kind)
    H, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_kv_heads * hd
    attn = H * (q_out + 2 * kv_out) + q_out * H
    if cfg.use_bias_in_attn_linear:
        attn += q_out + 2 * kv_out + H
    if cfg.use_separate_qk_norms:
        attn += _norm_params(cfg, q_out) + _norm_params(cfg, kv_out)
    if cfg.use_qk_layernorm:
        attn += _norm_params(cfg, q_out)
    if cfg.use_head_qk_norms:
        attn += 2 * _norm_params(cfg, hd)
    F = cfg.intermediate_size
    mlp = (3 if cfg.gated else 2) * H * F
    if cfg.use_bias_in_mlp:
        mlp += (2 * F if cfg.gated else F) + H
    if cfg.is_moe_layer(layer):
        mlp = moe_mlp_params(cfg, active)
    norms = 1 if (cfg.gpt_j_residual and cfg.gpt_j_tied) else 2
    return attn + mlp + norms * _norm_params(cfg, H)


def num_params(cfg: ModelConfig, include_embeddings: bool = True, active: bool = False) -> int:
    """Trainable parameters of ``Transformer(cfg)``.

    ``include_embeddings=False`` drops the input embedding and learned position embeddings (the
    Kaplan "non-embedding" count) but keeps an untied output head, which is a real matmul.
    """
    V, H = _vocab(cfg), cfg.hidden_size
    total = sum(layer_params(cfg, i, active) for i in range(cfg.num_layers)) + _norm_params(cfg, H)
    if not cfg.tie_word_embeddings:
        total += V * H
    if include_embeddings:
        total += V * H
        if cfg.pos_emb == "learned":
            total += cfg.max_position_embeddings * H
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token at sequence length ``seq_len`` (formula in the module docstring)."""
    V, H = _vocab(cfg), cfg.hidden_size
    matmul_params = num_params(cfg, include_embeddings=False, active=True) + (V * H if cfg.tie_word_embeddings else 0)
    window = cfg.sliding_window_width or seq_len
    attn = [t for t in cfg.attention_types if t not in MAMBA_TYPES]
    ctx = sum(min(seq_len, window) if t == "sliding" else seq_len for t in attn)
    scan = sum(scan_flops(cfg, t, seq_len) for t in cfg.attention_types if t in MAMBA_TYPES)
    return 6.0 * matmul_params + 12.0 * ctx * cfg.num_attention_heads * cfg.head_dim + 3.0 * scan
