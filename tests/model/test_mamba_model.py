"""Mamba blocks inside the one Transformer: recurrent cache, padding, init, parameter and FLOP
counts, and the distributed wrappers (activation checkpointing, pipeline stages) around them."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from neoxt.config.schema import ModelConfig
from neoxt.generate import SamplingParams, generate_tokens
from neoxt.model import KVCache, Transformer, flops_per_token, num_params

V = 97


def _cfg(types=("mamba", "global", "mamba2", "sliding"), **kw) -> ModelConfig:
    return ModelConfig(num_layers=len(types), hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                       intermediate_size=48, padded_vocab_size=V, norm="rmsnorm", activation="swiglu",
                       attention_types=types, sliding_window_width=5, mamba_d_state=8, mamba_headdim=16,
                       mamba_ngroups=2, mamba_chunk_size=8, **kw)


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" not in name and "dt_" not in name:
                p.mul_(3.0)  # sharper logits: greedy decoding has no near-ties
    return model


def test_cache_prefill_then_steps_equals_full_forward():
    model = _model(_cfg())
    tokens = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.cfg, 2, 30)
        parts = [model(tokens[:, :11], kv_cache=cache), model(tokens[:, 11:20], kv_cache=cache)]
        parts += [model(tokens[:, t:t + 1], kv_cache=cache) for t in range(20, 30)]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
        cache.reset()  # a reset cache starts again from a zero state
        torch.testing.assert_close(model(tokens[:, :11], kv_cache=cache), full[:, :11], atol=1e-5, rtol=1e-5)
    assert cache.keys[0] is None and cache.keys[1] is not None  # Mamba layers keep no keys


def test_padded_batch_generation_equals_each_prompt_alone_in_a_hybrid():
    model = _model(_cfg())
    prompts = [[5, 17, 44, 3, 25, 41, 7, 8, 9, 10, 11], [60, 61, 62], [20, 12, 13, 14, 15]]
    params = SamplingParams(maximum_tokens=8)
    batched = generate_tokens(model, prompts, params, pad_id=1)
    for prompt, row in zip(prompts, batched, strict=True):
        assert row.tokens == generate_tokens(model, [prompt], params, pad_id=1)[0].tokens


def test_ssm_parameters_get_state_spaces_init():
    model = Transformer(_cfg())
    m1, m2 = model.layers[0].mixer, model.layers[2].mixer
    assert torch.equal(m1.A_log, torch.log(torch.arange(1, 9.0)).expand(64, 8))
    assert torch.equal(m2.A_log, torch.log(torch.arange(1, 5.0)))
    assert bool((m1.D == 1).all()) and bool((m2.D == 1).all())
    dt = torch.nn.functional.softplus(torch.cat([m1.dt_proj.bias, m2.dt_bias]))
    assert bool((dt >= 1e-4).all()) and bool((dt <= 0.1 + 1e-6).all())
    assert model.layers[0].mixer.out_proj.weight.std() < model.layers[0].mixer.in_proj.weight.std()


@pytest.mark.parametrize("kw", [{}, {"mamba_use_bias_in_linears": True, "mamba_use_bias_in_conv": False},
                                {"no_weight_tying": True, "mamba_dt_rank": 5, "mamba_expand": 3}])
def test_num_params_counts_mamba_blocks(kw):
    cfg = _cfg(types=("mamba", "mamba2", "global"), **kw)
    if kw.get("mamba_expand") == 3:
        cfg = replace(cfg, mamba_headdim=24)
    assert num_params(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())


def test_flops_per_token_counts_the_scan():
    pure = _cfg(types=("mamba", "mamba"))
    n_matmul = num_params(pure, include_embeddings=False) + V * 32
    assert flops_per_token(pure, 64) == 6 * n_matmul + 3 * 2 * 9 * 64 * 8
    ssd = _cfg(types=("mamba2",))
    heads, p, n = 4, 16, 8
    q = 8  # mamba_chunk_size
    scan = heads * (2 * q * (n + p) + 4 * p * n)
    assert flops_per_token(ssd, 64) == 6 * (num_params(ssd, include_embeddings=False) + V * 32) + 3 * scan
    hybrid = _cfg(types=("mamba", "global"))
    attention = 12 * 64 * 4 * 8
    assert flops_per_token(hybrid, 64) == 6 * (num_params(hybrid, include_embeddings=False) + V * 32) \
        + attention + 3 * 9 * 64 * 8
    assert math.isfinite(flops_per_token(hybrid, 64))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_wraps_mamba_blocks(mode):
    from neoxt.distributed.parallelize import apply_activation_checkpointing

    model = _model(_cfg()).train()
    other = copy.deepcopy(model)
    apply_activation_checkpointing(other, mode)
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(2))
    pad = torch.ones(2, 20, dtype=torch.bool)
    pad[1, :4] = False
    for kw in ({}, {"key_padding_mask": pad}):
        model.zero_grad()
        other.zero_grad()
        model(tokens, **kw).square().mean().backward()
        other(tokens, **kw).square().mean().backward()
        for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_pipeline_stages_run_mamba_blocks():
    from neoxt.distributed.pipeline import make_stage_module

    model = _model(_cfg(no_weight_tying=True))  # (pipeline stages need an untied head)
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    first = make_stage_module(model, range(0, 2), first=True, last=False)
    last = make_stage_module(model, range(2, 4), first=False, last=True)
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens)), model(tokens), atol=1e-5, rtol=1e-5)


def test_state_space_parameters_get_no_weight_decay():
    from neoxt.train.optim import param_groups

    model = Transformer(_cfg())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    for i, leaf in ((0, "A_log"), (0, "D"), (2, "A_log"), (2, "D"), (2, "dt_bias"), (2, "norm.weight")):
        assert f"layers.{i}.mixer.{leaf}" in skipped
    assert "layers.0.mixer.in_proj.weight" in {names[id(p)] for p in decay["params"]}
