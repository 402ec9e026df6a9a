"""What `neoxt train` refuses under pipe_parallel_size > 1, before any process group exists."""

from __future__ import annotations

from dataclasses import replace

import pytest
from trainkit import PatternSource, tiny_config

from neoxt.config.schema import ParallelismConfig
from neoxt.errors import ConfigError
from neoxt.train.checkpointer import flat_optimizer_state
from neoxt.train.loop import train
from neoxt.train.setup import TrainData


def _pipelined(**sections):
    cfg = tiny_config()
    cfg = replace(cfg, parallelism=ParallelismConfig(pipe_parallel_size=2))
    for name, values in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    return cfg


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"training": {"train_impl": "dpo"}}, "train_impl"),
        ({"data": {"reset_attention_mask": True}}, "reset_attention_mask"),
        ({"data": {"reset_position_ids": True}}, "reset_position_ids"),
        ({"evaluation": {"eval_tasks": ("lambada_openai",)}}, "eval_tasks"),
    ],
)
def test_pipeline_refuses_what_its_stages_cannot_run(sections, key):
    with pytest.raises(ConfigError, match=key) as err:
        train(_pipelined(**sections), data=TrainData(PatternSource()))
    assert "pipe_parallel_size > 1" in str(err.value)


def test_optimizer_state_layout_is_read_from_the_saved_keys():
    nested = {"optimizer.param_groups.0.lr", "optimizer.state.embed.weight.exp_avg", "model.embed.weight"}
    flat = {"optimizer.param_groups.layers.0.attn.q.weight.lr", "optimizer.state.embed.weight.exp_avg"}
    assert not flat_optimizer_state(nested)
    assert flat_optimizer_state(flat)
    assert not flat_optimizer_state({"model.embed.weight"})
