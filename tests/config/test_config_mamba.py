"""Mamba in configs: upstream GPT-NeoX's five configs/mamba/*.yml resolve with `neoxt config` and
build the model upstream describes; attention_config mixes attention and Mamba layers."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from neoxt.cli import main
from neoxt.config import config_from_dict, config_to_yaml, load_config
from neoxt.errors import ConfigError
from neoxt.model import Transformer, num_params

UPSTREAM = sorted((Path(__file__).parent / "fixtures" / "mamba").glob("mamba-*.yml"))
SHAPES = {"130M": (24, 768), "370M": (48, 1024), "790M": (48, 1536), "1.4B": (48, 2048), "2.8B": (64, 2560)}


def test_all_five_upstream_configs_are_here():
    assert sorted(p.stem.removeprefix("mamba-") for p in UPSTREAM) == sorted(SHAPES)


@pytest.mark.parametrize("path", UPSTREAM, ids=lambda p: p.stem)
def test_upstream_mamba_config_resolves(path, capsys, tmp_path):
    assert main(["config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config([path])
    assert printed["attention_config"] == [[["mamba"], cfg.model.num_layers]]
    m = cfg.model
    layers, hidden = SHAPES[path.stem.removeprefix("mamba-")]
    assert (m.num_layers, m.hidden_size) == (layers, hidden)
    assert m.attention_types == ("mamba",) * layers and not m.has_attention
    # upstream's block: d_inner = 2 x hidden, dt rank ceil(hidden / 16), d_state 16, conv 4, conv bias
    assert (m.mamba_inner, m.mamba_rank, m.mamba_d_state, m.mamba_d_conv) == (2 * hidden, math.ceil(hidden / 16), 16, 4)
    assert m.mamba_use_bias_in_conv and not m.mamba_use_bias_in_linears
    assert m.norm == "rmsnorm" and m.rms_norm_epsilon == 1e-5
    assert m.output_layer_init_method == "single_residual_scaled_normal"
    assert cfg.training.precision == "fp16" and cfg.parallelism.checkpoint_activations
    (tmp_path / "resolved.yml").write_text(config_to_yaml(cfg))
    assert load_config([tmp_path / "resolved.yml"]) == cfg  # the printed config resolves to itself


def test_upstream_130m_builds_the_state_spaces_model():
    """mamba-130M.yml describes state-spaces/mamba-130m: 129,135,360 parameters with its 50280-token
    vocabulary (the count of transformers' MambaForCausalLM of that shape, head tied)."""
    cfg = replace(load_config([UPSTREAM[0].parent / "mamba-130M.yml"]).model, padded_vocab_size=50280)
    assert num_params(cfg) == 129_135_360  # num_params equals our model's own count: see the hybrid test


def test_hybrid_attention_config():
    cfg = config_from_dict({
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96,
        "attention_config": [[["global", "mamba"], 1], [["mamba2", "sliding"], 1]], "sliding_window": 8,
        "mamba_headdim": 16, "mamba_d_state": 8,
    })
    m = cfg.model
    assert m.attention_types == ("global", "mamba", "mamba2", "sliding") and m.has_attention
    # GPT-NeoX: intermediate_size sizes the Mamba blocks in a hybrid stack too (and the MLPs)
    assert m.intermediate_size == 96 and m.mamba_inner == 96
    model = Transformer(replace(m, padded_vocab_size=100))
    assert sum(p.numel() for p in model.parameters()) == num_params(replace(m, padded_vocab_size=100))
    assert [type(b).__name__ for b in model.layers] == ["Block", "MambaBlock", "MambaBlock", "Block"]


@pytest.mark.parametrize("kinds", [[[["mamba"], 2]], [[["global", "mamba"], 1]]], ids=["pure", "hybrid"])
def test_mamba_width_reads_upstream_keys(kinds):
    """Upstream sizes Mamba blocks from intermediate_size / expansion_factor, else 2 x hidden."""
    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "attention_config": kinds}
    assert config_from_dict({**base, "intermediate_size": 96}).model.mamba_inner == 96
    assert config_from_dict({**base, "expansion_factor": 3}).model.mamba_inner == 192
    assert config_from_dict({**base, "mamba_d_inner": 80}).model.mamba_inner == 80
    assert config_from_dict(base).model.mamba_inner == 128


def test_bad_mamba2_shape_names_the_key():
    cfg = config_from_dict({"num_layers": 1, "hidden_size": 48, "attention_config": [[["mamba2"], 1]],
                            "mamba_headdim": 64})
    with pytest.raises(ConfigError, match="mamba_headdim"):
        Transformer(replace(cfg.model, padded_vocab_size=64))


def test_unknown_layer_type_lists_mamba():
    with pytest.raises(ConfigError, match="mamba, mamba2"):
        config_from_dict({"num_layers": 1, "attention_config": [[["rwkv"], 1]]})
