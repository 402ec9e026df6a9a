"""The Transformer on its own: parameter-name contract, counts, init, KV cache, masks, backends."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from neoxt.config.schema import ModelConfig
from neoxt.errors import ConfigError
from neoxt.model import KVCache, Transformer, flops_per_token, init_weights, num_params, preset
from neoxt.model.attention import flex_sliding_attention, sdpa_attention

TINY = ("gpt-neox-tiny", "llama-tiny", "olmo3-tiny")


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains/biases so a mapping mistake shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _variants() -> dict[str, ModelConfig]:
    v = {name: preset(name) for name in TINY}
    v["gpt-neox-sequential"] = preset("gpt-neox-tiny", gpt_j_residual=False)
    v["gpt-j-tied"] = preset("gpt-neox-tiny", gpt_j_tied=True)
    v["llama-tied"] = preset("llama-tiny", no_weight_tying=False)
    v["post-norm-learned"] = preset("gpt-neox-tiny", gpt_j_residual=False, norm_placement="post", pos_emb="learned")
    v["neox-qk-layernorm"] = preset("gpt-neox-tiny", use_qk_layernorm=True)
    v["rms-qk-layernorm"] = preset("llama-tiny", num_kv_heads=4, use_qk_layernorm=True)
    return v


def test_parameter_names_follow_the_contract():
    names = set(Transformer(preset("gpt-neox-tiny")).state_dict())
    assert {"embed.weight", "final_norm.weight", "final_norm.bias", "lm_head.weight",
            "layers.0.attn_norm.weight", "layers.0.attn_norm.bias", "layers.0.mlp_norm.weight",
            "layers.1.attn.q.weight", "layers.1.attn.q.bias", "layers.1.attn.k.weight", "layers.1.attn.v.bias",
            "layers.1.attn.o.weight", "layers.1.mlp.up.weight", "layers.1.mlp.down.bias"} <= names
    assert not any("gate" in n for n in names)

    olmo = Transformer(preset("olmo3-tiny")).state_dict()
    assert olmo["layers.0.attn.q_norm.weight"].shape == (64,)
    assert "layers.0.mlp.gate.weight" in olmo and not any(n.endswith(".bias") for n in olmo)

    llama = Transformer(preset("llama-tiny", no_weight_tying=False)).state_dict()
    assert "lm_head.weight" not in llama
    assert llama["layers.0.attn.k.weight"].shape == (2 * 16, 64)  # GQA: 2 kv heads of 16

    tied = Transformer(preset("gpt-neox-tiny", gpt_j_tied=True)).state_dict()
    assert "layers.0.mlp_norm.weight" not in tied


@pytest.mark.parametrize("name", sorted(_variants()))
def test_num_params_matches_the_model(name):
    cfg = _variants()[name]
    model = Transformer(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    embeddings = model.embed.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed is not None else 0)
    assert num_params(cfg, include_embeddings=False) == num_params(cfg) - embeddings


def test_flops_per_token_formula():
    cfg = preset("olmo3-tiny")  # 4 layers, window 16: 3 sliding + 1 global
    T = 64
    n = num_params(cfg, include_embeddings=False)
    ctx = 3 * 16 + 1 * 64
    assert flops_per_token(cfg, T) == 6 * n + 12 * ctx * 64
    neox = preset("gpt-neox-tiny")
    assert flops_per_token(neox, 32) == 6 * num_params(neox, include_embeddings=False) + 12 * 2 * 32 * 64
    assert num_params(preset("llama-7b")) == 6_738_415_616  # LLaMA-2-7B's published count
    assert num_params(preset("gpt-neox-7b")) == 6_857_302_016  # Pythia-6.9B's published count


def test_init_methods_follow_gpt_neox_formulas():
    cfg = preset("llama-tiny", num_layers=4, hidden_size=256, num_attention_heads=4, num_kv_heads=4,
                 intermediate_size=512, init_method="small_init", output_layer_init_method="wang_init",
                 attention_types=("global",) * 4)
    model = Transformer(cfg)
    q = model.layers[0].attn.q.weight
    o = torch.cat([layer.attn.o.weight.flatten() for layer in model.layers] +
                  [layer.mlp.down.weight.flatten() for layer in model.layers])
    assert q.std().item() == pytest.approx(math.sqrt(2 / (5 * 256)), rel=0.05)
    assert o.std().item() == pytest.approx(2 / 4 / math.sqrt(256), rel=0.05)
    assert torch.all(model.final_norm.weight == 1)

    scaled = replace(cfg, init_method="normal", output_layer_init_method="scaled_normal", init_method_std=0.05)
    init_weights(model, scaled)
    assert model.embed.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.layers[2].mlp.down.weight.std().item() == pytest.approx(0.05 / math.sqrt(8), rel=0.05)
    neox = Transformer(preset("gpt-neox-tiny"))
    assert torch.all(neox.layers[0].attn.q.bias == 0) and torch.all(neox.final_norm.bias == 0)
    with pytest.raises(ConfigError, match="unknown init method 'bogus'"):
        Transformer(replace(cfg, init_method="bogus"))


@pytest.mark.parametrize("name", sorted(_variants()))
def test_kv_cache_matches_full_forward(name):
    """Prefill + chunked + one-token steps through the cache give the no-cache logits."""
    cfg = _variants()[name]
    model = _model(cfg)
    tokens = torch.randint(0, cfg.padded_vocab_size, (2, 40))  # longer than olmo3-tiny's window of 16
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(cfg, batch_size=2, max_seq_len=48)
        parts = [model(tokens[:, :20], kv_cache=cache), model(tokens[:, 20:27], kv_cache=cache)]
        parts += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(27, 40)]
    assert cache.seq_len == 40
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.seq_len == 0
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(2, 49, dtype=torch.long), kv_cache=cache)


def test_sliding_window_changes_only_far_positions():
    cfg = preset("olmo3-tiny")
    model = _model(cfg)
    global_model = Transformer(replace(cfg, attention_types=("global",) * 4)).eval()
    global_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 512, (1, 48))
    with torch.no_grad():
        a, b = model(tokens), global_model(tokens)
    torch.testing.assert_close(a[:, :16], b[:, :16])  # inside the window both see everything
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", TINY)
def test_left_padding_with_key_padding_mask(name):
    """A left-padded row decodes like the same prompt alone (batched generation contract)."""
    cfg = preset(name)
    model = _model(cfg)
    torch.manual_seed(1)
    prompt = torch.randint(0, cfg.padded_vocab_size, (1, 21))
    pad = 5
    batch = torch.cat([torch.full((1, pad), 7), prompt], dim=1)
    batch = torch.cat([batch, torch.randint(0, cfg.padded_vocab_size, (1, 26))])
    keep = torch.ones(2, 26, dtype=torch.bool)
    keep[0, :pad] = False
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(prompt)
        cache = KVCache(cfg, 2, 40)
        first = model(batch, positions=positions, kv_cache=cache, key_padding_mask=keep)
        nxt = torch.tensor([[3], [4]])
        keep2 = torch.cat([keep, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        step = model(nxt, positions=positions[:, -1:] + 1, kv_cache=cache, key_padding_mask=keep2)
        alone_step = model(torch.cat([prompt, nxt[:1]], dim=1))[:, -1]
    torch.testing.assert_close(first[0, pad:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], alone_step[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(first).all() and torch.isfinite(step).all()


def test_document_mask_equals_separate_documents():
    cfg = preset("llama-tiny")
    model = _model(cfg)
    a, b = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (1, 20))
    tokens = torch.cat([a, b], dim=1)
    doc = torch.tensor([0] * 12 + [1] * 20)
    attn_mask = (doc[:, None] == doc[None, :])[None, None]
    positions = torch.cat([torch.arange(12), torch.arange(20)])[None]
    with torch.no_grad():
        packed = model(tokens, positions=positions, attn_mask=attn_mask)
        torch.testing.assert_close(packed[:, :12], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 12:], model(b), atol=1e-5, rtol=1e-5)


def test_flex_attention_matches_explicit_mask_forward():
    """flex_attention (block mask) vs SDPA with an explicit sliding-window mask, forward only on CPU."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 96, 16)
    k, v = torch.randn(2, 2, 96, 16), torch.randn(2, 2, 96, 16)
    i = torch.arange(96)
    mask = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 24))[None, None]
    with torch.no_grad():
        torch.testing.assert_close(flex_sliding_attention(q, k, v, 24), sdpa_attention(q, k, v, mask),
                                   atol=2e-5, rtol=2e-5)
    cfg = preset("olmo3-tiny")
    model = _model(cfg)
    tokens = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        ref = model(tokens)
        model.set_attention_backend("flex")
        flex = model(tokens)
    torch.testing.assert_close(flex, ref, atol=2e-5, rtol=2e-5)


def test_training_step_on_cpu_with_sliding_windows():
    cfg = preset("olmo3-tiny", hidden_dropout=0.1, attention_dropout=0.1)
    model = Transformer(cfg).train()
    tokens = torch.randint(0, 512, (2, 40))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].attn.q_norm.weight.grad.abs().sum() > 0


def test_qk_layernorm_normalises_like_upstream():
    """LayerNorm variant reduces over [heads, head_dim]: scaling the q projection leaves logits unchanged."""
    cfg = preset("gpt-neox-tiny", use_qk_layernorm=True, use_bias_in_attn_linear=False)
    model = _model(cfg)
    assert model.layers[0].attn.qk_norm.weight.shape == (4, 16)
    tokens = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        before = model(tokens)
        for layer in model.layers:
            layer.attn.q.weight.mul_(3.0)
        after = model(tokens)
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm, joint", [("layernorm", True), ("rmsnorm", False)])
def test_qk_layernorm_reduction_follows_upstream(norm, joint):
    """Upstream's qk_layernorm has a [heads, head_dim] gain; torch LayerNorm then normalises over all
    heads jointly, upstream's RMSNorm over head_dim only: scaling one head moves the others iff joint."""
    name = "gpt-neox-tiny" if norm == "layernorm" else "llama-tiny"
    attn = Transformer(preset(name, num_kv_heads=4, use_qk_layernorm=True)).layers[0].attn
    x = torch.randn(1, 3, 4, 16)
    scaled = x.clone()
    scaled[:, :, 0] *= 10
    other_heads_moved = not torch.allclose(attn.qk_norm(x)[:, :, 1:], attn.qk_norm(scaled)[:, :, 1:])
    assert other_heads_moved == joint


@pytest.mark.parametrize("change, message", [
    (dict(padded_vocab_size=None), "padded_vocab_size"),
    (dict(attention_types=("global",)), "attention_types has 1 entries"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(attention_types=("sliding", "global"), sliding_window_width=None), "sliding_window_width"),
    (dict(norm_placement="olmo3"), "gpt_j_residual"),
    (dict(use_qk_layernorm=True, num_kv_heads=2), "use_qk_layernorm"),
])
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        Transformer(preset("gpt-neox-tiny", **change))


def test_presets_build_and_7b_shapes():
    with pytest.raises(KeyError, match="known"):
        preset("gpt-5")
    olmo = preset("olmo3-7b")
    assert olmo.attention_types[:4] == ("sliding", "sliding", "sliding", "global")
    assert olmo.rotary_emb_base == 500000.0 and olmo.use_separate_qk_norms
    for name in TINY:
        assert Transformer(preset(name))(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 512)
