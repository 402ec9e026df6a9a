"""Acceptance 1: greedy generation from a converted tiny model equals HF ``generate`` token for token."""

from __future__ import annotations

import pytest
import torch

from neoxt.generate import SamplingParams, generate_tokens
from neoxt.model import Transformer
from neoxt.model.hf_names import detect_architecture, hf_to_neoxt_state_dict, model_config_from_hf

PROMPTS = [[5, 17, 42, 9, 88, 101, 7, 3, 19], [200, 12], [64, 64, 3, 250, 31]]
PAD = 1


def _hf_model(arch: str):
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Olmo3Config,
        Olmo3ForCausalLM,
    )

    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=0,
                  bos_token_id=0)
    torch.manual_seed(0)
    if arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    else:  # sliding window of 8 on three of four layers: the window is crossed while generating
        model = Olmo3ForCausalLM(Olmo3Config(**{**common, "num_hidden_layers": 4}, sliding_window=8,
                                             layer_types=["sliding_attention"] * 3 + ["full_attention"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return model.eval()


def _convert(hf_model) -> Transformer:
    arch = detect_architecture(hf_model.config.to_dict(), "config")
    cfg = model_config_from_hf(hf_model.config, arch)
    model = Transformer(cfg)
    model.load_state_dict(hf_to_neoxt_state_dict(hf_model.state_dict(), cfg, arch))
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "olmo3"])
def test_greedy_batch_equals_hf_generate(arch):
    hf = _hf_model(arch)
    ours = _convert(hf)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    steps = 20
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          pad_token_id=PAD, eos_token_id=0)[:, width:]
    out = generate_tokens(ours, PROMPTS, SamplingParams(maximum_tokens=steps, stop_token_ids=(0,)), pad_id=PAD)
    for row, done in zip(ref.tolist(), out):
        expected = row[: row.index(0)] if 0 in row else row
        assert list(done.tokens) == expected
    # The uncached path gives the same tokens.
    again = generate_tokens(ours, PROMPTS, SamplingParams(maximum_tokens=steps, stop_token_ids=(0,)), pad_id=PAD,
                            use_cache=False)
    assert [d.tokens for d in again] == [d.tokens for d in out]
