"""float8 through torchao: refused in one line where there is no sm89+ CUDA GPU (this CPU), and the
conversion itself (torchao's emulation of the float8 GEMMs) keeps names and the loss on CPU."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from neoxt.config.schema import ModelConfig, RunConfig
from neoxt.errors import ConfigError
from neoxt.model import Transformer
from neoxt.train.setup import check_config


def _cfg(recipe: str | None, **par) -> RunConfig:
    cfg = RunConfig()
    return replace(cfg, training=replace(cfg.training, train_iters=1, float8_recipe=recipe),
                   parallelism=replace(cfg.parallelism, **par))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a CPU-only machine gives")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_is_refused_in_one_line_on_cpu(recipe):
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(recipe))
    message = str(err.value)
    assert "\n" not in message and f"float8_recipe: {recipe}" in message and "compute capability 8.9" in message


def test_float8_bad_recipe_and_tensor_parallel_are_refused():
    with pytest.raises(ConfigError, match="float8_recipe must be one of"):
        check_config(_cfg("blockwise"))
    with pytest.raises(ConfigError, match="model_parallel_size"):
        check_config(_cfg("rowwise", model_parallel_size=2))
    check_config(_cfg(None))  # off by default: nothing to refuse


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_conversion_emulated_keeps_names_and_loss(recipe):
    pytest.importorskip("torchao.float8", reason="the float8 extra (pip install 'neoxt[float8]') is not installed")
    from torchao.float8.float8_linear import Float8Linear

    from neoxt.distributed.float8 import apply_float8

    torch.manual_seed(0)
    model = Transformer(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=4,
                                    intermediate_size=128, padded_vocab_size=128))
    f8 = copy.deepcopy(model)
    assert apply_float8(f8, recipe, emulate=True) == 12  # q, k, v, o, up, down in each of 2 blocks
    assert isinstance(f8.layers[0].mlp.up, Float8Linear) and not isinstance(f8.lm_head, Float8Linear)
    assert list(f8.state_dict()) == list(model.state_dict())  # checkpoints interchangeable
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss = F.cross_entropy(f8(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()  # float8 rounding, not a different model
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f8.parameters())
