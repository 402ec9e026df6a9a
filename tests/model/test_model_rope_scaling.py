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
