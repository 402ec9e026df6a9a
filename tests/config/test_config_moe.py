"""MoE acceptance 5: upstream GPT-NeoX's MoE config (and the 2.x DeepSpeed-MoE keys) resolve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neoxt.config import load_config
from neoxt.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"


def test_upstream_dmoe_config_resolves():
    cfg = load_config([FIXTURES / "dmoe-125m.yml", FIXTURES / "local_setup.yml"])
    m = cfg.model
    assert m.moe_num_experts == 8 and m.moe_top_k == 1 and m.moe_router_type == "sinkhorn"
    assert all(m.is_moe_layer(i) for i in range(12)) and m.moe_width == 4 * 768
    assert cfg.training.precision == "bf16"


def test_neoxt_config_prints_the_moe_keys():
    out = subprocess.run([sys.executable, "-m", "neoxt.cli", "config", str(FIXTURES / "dmoe-125m.yml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model = yaml.safe_load(out.stdout)  # flat, GPT-NeoX key names
    assert model["moe_num_experts"] == 8 and model["moe_router_type"] == "sinkhorn"


def test_deepspeed_era_moe_keys_map(tmp_path):
    path = tmp_path / "moe.yml"
    path.write_text('{"moe_type": "deepspeed", "moe_num_experts": 4, "moe_token_dropping": true, '
                    '"moe_train_capacity_factor": 1.25, "moe_min_capacity": 2, "moe_loss_coeff": 0.1, '
                    '"expert_interval": 2, "moe_expert_parallel_size": 2, "num_layers": 4, '
                    '"moe_top_k": 2, "moe_router_type": "topk", "moe_jitter_eps": 0.01}')
    m = load_config([path]).model
    assert m.moe_token_dropping and m.moe_train_capacity_factor == 1.25 and m.moe_min_capacity == 2
    assert m.moe_aux_loss_coeff == 0.1 and m.moe_expert_interval == 2 and m.moe_jitter_eps == 0.01
    assert [m.is_moe_layer(i) for i in range(4)] == [True, False, True, False]  # upstream: i % interval == 0
    assert load_config([path]).parallelism.moe_expert_parallel_size == 2


def test_residual_moe_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "res.yml"
    path.write_text('{"moe_num_experts": 4, "moe_use_residual": true}')
    with pytest.raises(ConfigError, match=r"res\.yml:1: moe_use_residual: True is not supported"):
        load_config([path])
