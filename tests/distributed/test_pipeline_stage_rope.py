"""Pipeline stage modules rotate with the same RoPE tables as ``Transformer.forward``: scaled
frequencies on the layers whose attention type is scaled, plain ones on the others (single process)."""

from __future__ import annotations

import pytest
import torch

from neoxt.config.schema import ModelConfig
from neoxt.distributed.pipeline import make_stage_module
from neoxt.model import Transformer


@pytest.mark.parametrize("placement", ["pre", "olmo3"])
def test_stages_chained_equal_the_full_model_with_rope_scaling(placement):
    cfg = ModelConfig(
        num_layers=3, hidden_size=32, num_attention_heads=4, num_kv_heads=4, intermediate_size=64,
        max_position_embeddings=64, padded_vocab_size=64, pos_emb="rotary", norm_placement=placement,
        attention_types=("sliding", "global", "sliding"), sliding_window_width=4,
        rope_scaling_type="linear", rope_scaling_factor=8.0, rope_scaling_layers="global",
        no_weight_tying=True,  # pipelines need an untied head (it lives on the last stage)
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init's: sharp attention, so positions matter
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    tokens = torch.randint(0, 64, (2, 12))
    stages = [make_stage_module(model, range(0, 1), True, False),
              make_stage_module(model, range(1, 3), False, True)]
    with torch.no_grad():
        want = model(tokens)
        got = stages[1](stages[0](tokens))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
