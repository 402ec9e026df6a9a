"""What `neoxt train` refuses under pipe_parallel_size > 1, before any process group exists."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
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


@pytest.mark.parametrize(
    ("chunk", "tp", "chunked"), [(1024, 1, True), (5, 1, True), (0, 1, False), (1024, 2, False)]
)
def test_pipeline_objective_projects_in_chunks_unless_off_or_tensor_parallel(monkeypatch, chunk, tp, chunked):
    """The objective hands build_pipeline its chunked head loss (``loss_chunk_size`` tokens a chunk)
    unless ``loss_chunk_size: 0`` or tensor parallel; tests/distributed/test_pipeline_chunked_loss.py
    runs both paths on 2 ranks."""
    import neoxt.distributed.pipeline as pipeline
    from neoxt.train.objectives.base import ObjectiveContext
    from neoxt.train.objectives.pipeline import PipelineObjective

    seen = {}

    def fake_build(model, cfg, mesh, n_microbatches, loss_fn, head_loss):
        seen.update(loss_fn=loss_fn, head_loss=head_loss)
        return SimpleNamespace(parts=[])

    monkeypatch.setattr(pipeline, "build_pipeline", fake_build)
    cfg = _pipelined(training={"loss_chunk_size": chunk})
    cfg = replace(cfg, parallelism=replace(cfg.parallelism, model_parallel_size=tp))
    ctx = ObjectiveContext(cfg=cfg, model=None, mesh=object(), group=None, dp_size=1, device=torch.device("cpu"),
                           fresh_start=True, load_weights=None, parallelize=lambda m: m)
    objective = PipelineObjective(ctx)
    assert seen["loss_fn"] is objective.loss_fn
    assert seen["head_loss"] == (objective.loss_fn.from_hidden if chunked else None)
    assert objective.loss_fn.chunk == (chunk if chunked else 0)
    assert not objective.loss_fn.recompute  # 1f1b: each micro-batch's backward follows soon after its forward


def test_gpipe_recomputes_the_chunked_logits_in_backward(monkeypatch):
    """GPipe holds every micro-batch's graph until its backwards: no [V, H] gradient per micro-batch."""
    import neoxt.distributed.pipeline as pipeline
    from neoxt.train.objectives.base import ObjectiveContext
    from neoxt.train.objectives.pipeline import PipelineObjective

    monkeypatch.setattr(pipeline, "build_pipeline", lambda *a, **k: SimpleNamespace(parts=[]))
    cfg = _pipelined()
    cfg = replace(cfg, parallelism=replace(cfg.parallelism, pipeline_schedule="gpipe"))
    ctx = ObjectiveContext(cfg=cfg, model=None, mesh=object(), group=None, dp_size=1, device=torch.device("cpu"),
                           fresh_start=True, load_weights=None, parallelize=lambda m: m)
    assert PipelineObjective(ctx).loss_fn.recompute
