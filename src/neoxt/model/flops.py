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
"""

from __future__ import annotations

from neoxt.config.schema import ModelConfig


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


def layer_params(cfg: ModelConfig, layer: int = 0, active: bool = False) -> int:
    """Parameters of transformer block ``layer`` (``active``: an MoE layer counts its top-k experts only)."""
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
    ctx = sum(min(seq_len, window) if t == "sliding" else seq_len for t in cfg.attention_types)
    return 6.0 * matmul_params + 12.0 * ctx * cfg.num_attention_heads * cfg.head_dim
