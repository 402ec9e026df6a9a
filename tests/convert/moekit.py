"""Tiny random HF mixture-of-experts models (Mixtral, OLMoE, Qwen3-MoE) for the conversion tests."""

from __future__ import annotations

import torch

VOCAB = 320  # the conftest tokenizer's vocabulary
MOE_ARCHS = ("mixtral", "olmoe", "qwen3_moe")


def hf_moe_config(arch: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                  intermediate_size=48, num_experts_per_tok=2, rms_norm_eps=1e-6)
    if arch == "mixtral":
        return MixtralConfig(**common, num_hidden_layers=2, num_local_experts=4)
    if arch == "olmoe":  # top-k weights not renormalised, whole-projection q/k norms
        return OlmoeConfig(**common, num_hidden_layers=2, num_experts=4, norm_topk_prob=False)
    # Qwen3-MoE: a dense layer (mlp_only_layers), per-head q/k norms, experts narrower than the dense MLP
    return Qwen3MoeConfig(**common, num_hidden_layers=3, num_experts=4, moe_intermediate_size=32,
                          norm_topk_prob=True, mlp_only_layers=[1])


def hf_moe_model(arch: str, seed: int = 0):
    """A random HF MoE causal LM with non-trivial norms and a sharp router (any slip changes logits)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_moe_config(arch), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif p.abs().max() == 0:  # routers start at zero in transformers 5
                p.normal_(0.0, 0.5)
            else:
                p.mul_(4.0)
    return model
