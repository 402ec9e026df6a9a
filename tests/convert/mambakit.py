"""Tiny random HF Mamba / Mamba-2 models (built from transformers configs, no download)."""

from __future__ import annotations

import torch

VOCAB = 320  # the conftest tokenizer's vocabulary


def hf_config(arch: str):
    from transformers import Mamba2Config, MambaConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1, layer_norm_epsilon=1e-5)
    if arch == "mamba":
        return MambaConfig(**common)
    # 4 heads of 16 in 2 groups; chunk 16 < the test sequences, so the SSD carries state across chunks
    return Mamba2Config(**common, num_heads=4, head_dim=16, n_groups=2, chunk_size=16, tie_word_embeddings=False)


def hf_model(arch: str, seed: int = 0):
    """A random HF Mamba model with non-trivial norms and biases (so any mapping slip changes logits)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name.endswith(".D"):
                p.add_(torch.randn_like(p) * 0.2)
            elif "A_log" not in name and "dt_" not in name:
                p.mul_(3.0)  # sharper logits: greedy decoding has no near-ties
    return model
