"""RoPE frequency scaling (linear, llama3, YaRN) against transformers' own implementations."""

from __future__ import annotations

import pytest
import torch

from neoxt.model.rope import inv_frequencies, scaled_inv_frequencies

CASES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn-olmo3": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                   "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1},
    "yarn-defaults": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                    "mscale": 1.0, "mscale_all_dim": 0.707, "truncate": False},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scaled_frequencies_match_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(CASES[name], rope_theta=500000.0)
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=65536, rope_parameters=params)
    ours, our_scale = scaled_inv_frequencies(128, 500000.0, params, 65536)
    if name == "default":
        theirs, scale = inv_frequencies(128, 500000.0), 1.0
    else:
        theirs, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    assert torch.equal(ours, theirs)
    assert our_scale == pytest.approx(scale, abs=0.0)
    if name != "default":
        assert not torch.equal(ours, inv_frequencies(128, 500000.0))


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="longrope"):
        scaled_inv_frequencies(64, 10000.0, {"rope_type": "longrope"}, 4096)


def _model_config(scaling: dict, norm_placement: str = "pre", layers: str = "all", **extra):
    from neoxt.config.schema import ModelConfig

    fields = {"factor": "rope_scaling_factor", "original_max_position_embeddings": "rope_original_max_position_embeddings",
              "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor",
              "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "attention_factor": "rope_attention_factor"}
    extra = {"hidden_size": 512, **extra}
    return ModelConfig(
        num_layers=4, num_attention_heads=4, max_position_embeddings=65536, padded_vocab_size=64,
        rotary_emb_base=500000.0, norm_placement=norm_placement, rope_scaling_type=scaling["rope_type"],
        rope_scaling_layers=layers, attention_types=("sliding", "global", "sliding", "global"),
        sliding_window_width=16, **{fields[k]: v for k, v in scaling.items() if k != "rope_type"}, **extra,
    )


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn-olmo3", "yarn-defaults"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_match_llama_rotary_embedding(name, dtype):
    """cos/sin bit for bit, rounding included: the attention factor multiplies in fp32, then rounds."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from neoxt.model.rope import rope_tables

    params = dict(CASES[name], rope_theta=500000.0)
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=65536,
                                          rope_parameters=params))
    positions = torch.arange(0, 60000, 7)[None]
    ref_cos, ref_sin = hf(torch.zeros(1, dtype=dtype), positions)
    tables = rope_tables(_model_config(CASES[name]), positions, dtype)
    assert tables["global"][0] is tables["sliding"][0]  # scaled on every layer: one table
    cos, sin = tables["global"]
    assert cos.dtype == dtype and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_rope_tables_match_olmo3_per_layer_type():
    """OLMo-3 YaRN on full-attention layers: sliding layers keep plain RoPE; fp32 tables in any dtype."""
    from transformers import Olmo3Config
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding

    from neoxt.model.rope import rope_tables

    scaling = dict(CASES["yarn-olmo3"])
    hf_cfg = Olmo3Config(hidden_size=512, num_attention_heads=4, num_hidden_layers=4, max_position_embeddings=65536,
                         layer_types=["sliding_attention", "full_attention"] * 2, rope_scaling=dict(scaling))
    hf = Olmo3RotaryEmbedding(hf_cfg)
    positions = torch.arange(0, 60000, 7)[None]
    tables = rope_tables(_model_config(scaling, "olmo3", "global"), positions, torch.bfloat16)
    for ours, hf_type in (("global", "full_attention"), ("sliding", "sliding_attention")):
        ref = hf(torch.zeros(1, dtype=torch.bfloat16), positions, hf_type)
        assert tables[ours][0].dtype == torch.float32
        assert torch.equal(tables[ours][0], ref[0]) and torch.equal(tables[ours][1], ref[1]), ours
    assert not torch.equal(tables["global"][0], tables["sliding"][0])


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling_factor": 0.0}, "rope_scaling_factor"),
    ({"rope_low_freq_factor": 4.0}, "rope_low_freq_factor"),
    ({"rope_original_max_position_embeddings": -1}, "rope_original_max_position_embeddings"),
    ({"pos_emb": "learned"}, "pos_emb"),
])
def test_bad_rope_scaling_config_names_the_key(change, match):
    import dataclasses

    from neoxt.errors import ConfigError
    from neoxt.model import Transformer

    cfg = dataclasses.replace(_model_config(CASES["llama3"], hidden_size=64), **change)
    with pytest.raises(ConfigError, match=match):
        Transformer(cfg)
