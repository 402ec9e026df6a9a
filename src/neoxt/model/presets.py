"""Named model shapes as code: tiny ones for tests and demos, 7B ones matching public checkpoints.

The 7B presets reproduce the published configs (Pythia-6.9B for GPT-NeoX, LLaMA-2-7B, OLMo-3 7B), so
``preset("olmo3-7b")`` builds a model whose parameter names and shapes accept the HF conversion of
``allenai/OLMo-3-1025-7B``. Vocabulary sizes are the padded ones those checkpoints ship.
"""

from __future__ import annotations

from dataclasses import replace

from neoxt.config.schema import ModelConfig


def _gpt_neox(layers: int, hidden: int, heads: int, vocab: int, max_pos: int) -> ModelConfig:
    return ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=max_pos, padded_vocab_size=vocab,
        norm="layernorm", layernorm_epsilon=1e-5, norm_placement="pre", gpt_j_residual=True,
        pos_emb="rotary", rotary_pct=0.25, rotary_emb_base=10000.0, activation="gelu",
        use_bias_in_attn_linear=True, use_bias_in_mlp=True, use_bias_in_norms=True, no_weight_tying=True,
        attention_types=("global",) * layers, init_method="small_init", output_layer_init_method="wang_init",
    )


def _llama(layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int, max_pos: int,
           tied: bool = False) -> ModelConfig:
    return ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv,
        intermediate_size=ffn, max_position_embeddings=max_pos, padded_vocab_size=vocab,
        norm="rmsnorm", rms_norm_epsilon=1e-5, use_bias_in_norms=False, norm_placement="pre",
        pos_emb="rotary", rotary_pct=1.0, rotary_emb_base=10000.0, activation="swiglu",
        use_bias_in_attn_linear=False, use_bias_in_mlp=False, no_weight_tying=not tied,
        attention_types=("global",) * layers, init_method="normal", output_layer_init_method="scaled_normal",
    )


def _olmo3(layers: int, hidden: int, heads: int, ffn: int, vocab: int, max_pos: int, window: int) -> ModelConfig:
    types = tuple("global" if (i + 1) % 4 == 0 else "sliding" for i in range(layers))
    return ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=heads,
        intermediate_size=ffn, max_position_embeddings=max_pos, padded_vocab_size=vocab,
        norm="rmsnorm", rms_norm_epsilon=1e-6, use_bias_in_norms=False, norm_placement="olmo3",
        use_separate_qk_norms=True, pos_emb="rotary", rotary_pct=1.0, rotary_emb_base=500000.0,
        activation="swiglu", use_bias_in_attn_linear=False, use_bias_in_mlp=False, no_weight_tying=True,
        attention_types=types, sliding_window_width=window,
        init_method="normal", output_layer_init_method="scaled_normal",
    )


PRESETS: dict[str, ModelConfig] = {
    "gpt-neox-tiny": _gpt_neox(layers=2, hidden=64, heads=4, vocab=512, max_pos=512),
    "gpt-neox-7b": _gpt_neox(layers=32, hidden=4096, heads=32, vocab=50432, max_pos=2048),
    "llama-tiny": _llama(layers=2, hidden=64, heads=4, kv=2, ffn=172, vocab=512, max_pos=512),
    "llama-7b": _llama(layers=32, hidden=4096, heads=32, kv=32, ffn=11008, vocab=32000, max_pos=4096),
    "olmo3-tiny": _olmo3(layers=4, hidden=64, heads=4, ffn=172, vocab=512, max_pos=512, window=16),
    "olmo3-7b": _olmo3(layers=32, hidden=4096, heads=32, ffn=11008, vocab=100352, max_pos=65536, window=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig called ``name`` (see ``PRESETS``), with any fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)
