"""An objective added from a test file, without touching ``src/``: registered in-process, and through
``NEOXT_PLUGINS`` for ``neoxt train``; it trains, checkpoints its own state and resumes exactly."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import toy_objective
from trainkit import PatternSource, tiny_config, train_killed_after, with_checkpoint

from conftest import run_neoxt_train
from neoxt.errors import ConfigError
from neoxt.train.loop import train
from neoxt.train.objectives import OBJECTIVES, load_plugins
from neoxt.train.setup import TrainData

HERE = Path(__file__).resolve().parent


def test_registered_objective_trains_checkpoints_and_resumes_exactly(tmp_path):
    cfg = with_checkpoint(tiny_config(save=tmp_path / "a", train_iters=6, train_impl="toy_token"), checkpoint_factor=3)
    steps: list[dict] = []
    ref = train(cfg, "", data=TrainData(PatternSource(seed=2)), log=lambda m: None,
                on_step=[lambda it, r: steps.append(r.metrics)])
    nll = [m["target_nll"] for m in steps]
    assert nll == sorted(nll, reverse=True) and nll[-1] < nll[0] - 1  # the target token's probability went up
    assert [m["toy_batches"] for m in steps] == [1, 2, 3, 4, 5, 6]

    cut = with_checkpoint(cfg, save=str(tmp_path / "b"))
    first = train_killed_after(4, cut, "", data=TrainData(PatternSource(seed=2)), log=lambda m: None)
    resumed: list[dict] = []
    second = train(cut, "", data=TrainData(PatternSource(seed=2)), log=lambda m: None,
                   on_step=[lambda it, r: resumed.append(r.metrics)])
    assert second.start_iteration == 3
    assert first.losses[:3] + second.losses == ref.losses  # exact float equality
    assert resumed == steps[3:]  # the objective's counter and generator were restored


class _Burst(toy_objective.ToyTokenObjective):
    """Every other update does not advance the iteration counter (a gradient-ascent style burst)."""

    def train_batch(self, micro, loss_scale):
        outcome = super().train_batch(micro, loss_scale)
        outcome.advance = self.batches % 2 == 0
        return outcome


def test_steps_that_do_not_advance_the_counter(tmp_path):
    from neoxt.train.objectives import register_objective

    register_objective("toy_burst", _Burst)
    cfg = with_checkpoint(tiny_config(save=tmp_path, train_iters=3, train_impl="toy_burst"), checkpoint_factor=1)
    seen: list[tuple[int, bool]] = []
    r = train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None,
              on_step=[lambda it, s: seen.append((it, s.advance))])
    assert seen == [(0, False), (1, True), (1, False), (2, True), (2, False), (3, True)]
    assert r.iteration == 3 and len(r.losses) == 6
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step1", "global_step2", "global_step3"]


def test_unknown_objective_names_the_key_and_the_choices():
    cfg = tiny_config(train_iters=1, train_impl="toy_tokn")
    with pytest.raises(ConfigError, match="train_impl: 'toy_tokn'.*did you mean 'toy_token'"):
        train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)


def test_plugins_env_imports_the_named_modules():
    assert load_plugins({"NEOXT_PLUGINS": "toy_objective"}) == ["toy_objective"]
    assert OBJECTIVES["toy_token"] is toy_objective.ToyTokenObjective
    with pytest.raises(ConfigError, match="NEOXT_PLUGINS.*no_such_plugin_module"):
        load_plugins({"NEOXT_PLUGINS": "no_such_plugin_module"})


def test_neoxt_train_runs_a_plugin_objective_and_resumes_exactly(tmp_path, corpus_dataset, monkeypatch):
    """The first part of the chain and the reference run in-process (same config file, same code
    path); ``neoxt train`` (a subprocess that knows the objective only through NEOXT_PLUGINS) resumes
    the chain from its checkpoint, trains on, and checkpoints at the end."""
    import yaml

    from neoxt.config import load_config

    tok, prefix = corpus_dataset
    monkeypatch.setenv("NEOXT_PLUGINS", "toy_objective")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))

    def config(name: str, **extra) -> dict:
        return {
            "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
            "max_position_embeddings": 32, "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}},
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_iters": 4,
            "data_path": prefix, "split": "100,0,0", "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file,
            "save": str(tmp_path / name), "checkpoint_factor": 2, "log_interval": 1, "seed": 3,
            "index_cache_dir": str(tmp_path / "cache"), "train_impl": "toy_token", **extra,
        }

    def in_process(name: str, **extra) -> None:
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(config(name, **extra)))
        train(load_config([str(path)]), None, log=lambda m: None)

    def records(name: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    in_process("straight")
    straight = records("straight")
    assert [r["toy_batches"] for r in straight] == [1, 2, 3, 4]  # the objective's metrics reach metrics.jsonl
    assert all(math.isfinite(r["loss"]) for r in straight) and straight[-1]["target_nll"] < straight[0]["target_nll"]
    in_process("chain", exit_interval=2)  # stops and saves at 2
    out = run_neoxt_train(config("chain", exit_interval=2), tmp_path / "chain.yml")
    assert "resuming from" in out.stdout and (tmp_path / "chain" / "global_step4").is_dir()
    chained = records("chain")
    assert [r["loss"] for r in chained] == [r["loss"] for r in straight]  # exact
    assert [r["toy_weight"] for r in chained] == [r["toy_weight"] for r in straight]
    assert [r["toy_batches"] for r in chained] == [1, 2, 3, 4]
