"""Gradient ascent / gradient difference (the fork's ga_* / gd_* keys) on tiny indexed data.

The LM stream is ``PatternSource`` (arithmetic sequences with steps 1-3); the retain set has the same
kind of sequences, the forget set sequences with steps 5 and 7, both written as indexed datasets.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trainkit import PatternSource, tiny_config, train_killed_after, with_checkpoint

from neoxt.checkpoint import latest_checkpoint
from neoxt.config.schema import UnlearningConfig
from neoxt.data.indexed import IndexedDatasetWriter
from neoxt.errors import ConfigError
from neoxt.model import Transformer
from neoxt.train.loop import train
from neoxt.train.setup import TrainData

FORGET_STEPS, RETAIN_STEPS = (5, 7), (1, 2, 3)


def _write(prefix, steps, seed, docs=64, length=40):
    g = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(docs):
            w.add_document((g.integers(0, 64) + g.choice(steps) * np.arange(length)) % 64)
    return str(prefix)


@pytest.fixture
def sets(tmp_path):
    return _write(tmp_path / "forget", FORGET_STEPS, 1), _write(tmp_path / "retain", RETAIN_STEPS, 2)


def _held_out(steps, seed, n=32):
    g = np.random.default_rng(seed)
    seq = torch.tensor(np.stack([(g.integers(0, 64) + g.choice(steps) * np.arange(17)) % 64 for _ in range(n)]))
    return seq[:, :-1], seq[:, 1:]


def _loss(model, batch):
    with torch.no_grad():
        return float(F.cross_entropy(model(batch[0]).reshape(-1, 64), batch[1].reshape(-1)))


def _cfg(u=None, save=None, **training):
    cfg = tiny_config(save=save, **training)
    return replace(cfg, unlearning=u) if u is not None else cfg


class Trace:
    """Step callback: (iteration after the step, advanced, batch_type, grad_norm, metrics) per step."""

    def __init__(self):
        self.steps = []

    def __call__(self, iteration, r):
        self.steps.append((iteration, r.advance, r.metrics.get("batch_type"), r.grad_norm, dict(r.metrics)))

    def kinds(self):
        return [int(s[2]) for s in self.steps]


def _run(cfg, trace=None, model=None, **kw):
    torch.manual_seed(0)
    model = model if model is not None else Transformer(cfg.model)
    r = train(cfg, "", data=TrainData(PatternSource(seed=3)), model=model, log=lambda m: None,
              on_step=[trace] if trace else [], **kw)
    return r, model


def test_gradient_difference_raises_forget_loss_and_keeps_retain_loss(sets):
    forget, retain = sets
    u = UnlearningConfig(ga_dataset=forget, ga_mode="interleaved", ga_interleave_ratio=1, gd_mode=True,
                         gd_retain_dataset=retain, gd_retain_weight=2.0)
    held_forget, held_retain = _held_out(FORGET_STEPS, 11), _held_out(RETAIN_STEPS, 12)
    torch.manual_seed(0)
    start = _loss(Transformer(tiny_config().model), held_forget)
    _, plain = _run(_cfg(train_iters=30))
    trace = Trace()
    _, gd = _run(_cfg(u, train_iters=30), trace)
    assert trace.kinds().count(2) == 14  # iterations 2, 4, ..., 28 (the fork's interleaving)
    assert _loss(gd, held_forget) > start + 0.5  # unlearned: the forget loss rose from its start ...
    assert _loss(gd, held_forget) > _loss(plain, held_forget) + 1.0  # ... while a plain run lowers it
    assert _loss(gd, held_retain) <= 1.10 * _loss(plain, held_retain)  # retained within 10% of a plain run
    gd_steps = [s[4] for s in trace.steps if s[2] == 2]
    assert all({"gd_forget_loss", "gd_retain_loss", "gd_combined_loss"} <= m.keys() for m in gd_steps)
    m = gd_steps[0]
    assert m["gd_combined_loss"] == pytest.approx(2.0 * m["gd_retain_loss"] - m["gd_forget_loss"])


def test_interval_bursts_at_configured_iterations_do_not_advance_the_counter(sets):
    forget, _ = sets
    u = UnlearningConfig(ga_dataset=forget, ga_mode="interval", ga_interval=3, ga_iters=2)
    trace = Trace()
    r, _ = _run(_cfg(u, train_iters=8), trace)
    assert r.iteration == 8
    # (iteration after the step, advanced?, batch_type): a burst of 2 after iterations 3 and 6, none after 8.
    assert [(s[0], s[1], int(s[2])) for s in trace.steps] == [
        (1, True, 0), (2, True, 0), (3, True, 0), (3, False, 1), (3, False, 1),
        (4, True, 0), (5, True, 0), (6, True, 0), (6, False, 1), (6, False, 1), (7, True, 0), (8, True, 0),
    ]
    ga = [s[4] for s in trace.steps if s[2] == 1]
    assert all(m["ga_objective"] == -m["ga_actual_loss"] for m in ga)
    # The LM stream is not consumed by bursts: 8 iterations x 2 micro-batches.
    assert len(r.losses) == 12


def test_interleaved_mode_alternates_at_the_ratio(sets):
    forget, retain = sets
    u = UnlearningConfig(ga_dataset=forget, ga_mode="interleaved", ga_interleave_ratio=2)
    trace = Trace()
    r, _ = _run(_cfg(u, train_iters=10), trace)
    assert r.iteration == 10 and all(s[1] for s in trace.steps)  # GA iterations count as iterations
    assert trace.kinds() == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1]  # i > 0 and i % (ratio + 1) == 0, as the fork
    trace = Trace()
    _run(_cfg(replace(u, ga_interleave_ratio=1, gd_mode=True, gd_retain_dataset=retain), train_iters=6), trace)
    assert trace.kinds() == [0, 0, 2, 0, 2, 0]


def test_threshold_stops_gradient_ascent_below_it(sets):
    forget, _ = sets
    base = UnlearningConfig(ga_dataset=forget, ga_mode="interleaved", ga_interleave_ratio=1)
    trace = Trace()
    _run(_cfg(base, train_iters=8), trace)
    assert all(s[3] > 0 for s in trace.steps if s[2] == 1)  # no threshold: every GA step updates

    trace = Trace()  # per_step, threshold above any loss: forward runs, no GA update is applied
    _run(_cfg(replace(base, ga_loss_threshold=100.0), train_iters=8), trace)
    ga = [s for s in trace.steps if s[2] == 1]
    assert len(ga) == 3 and all(s[3] == 0.0 for s in ga)
    assert ga[-1][4]["ga_steps_skipped_total"] == 3 and ga[-1][4]["ga_steps_performed_total"] == 0

    trace = Trace()  # threshold below any loss: every step is performed
    _run(_cfg(replace(base, ga_loss_threshold=0.0), train_iters=8), trace)
    assert all(s[3] > 0 for s in trace.steps if s[2] == 1)

    trace = Trace()  # skip_forward with the EMA: after the first measured GA step, GA iterations become LM ones
    _run(_cfg(replace(base, ga_loss_threshold=100.0, ga_threshold_check_mode="ema", ga_threshold_skip_forward=True),
              train_iters=8), trace)
    assert trace.kinds() == [0, 0, 1, 0, 0, 0, 0, 0]

    trace = Trace()  # per_burst (interval): the first burst runs, later ones are skipped whole
    u = UnlearningConfig(ga_dataset=forget, ga_mode="interval", ga_interval=2, ga_iters=2,
                         ga_loss_threshold=100.0, ga_threshold_check_mode="per_burst")
    _run(_cfg(u, train_iters=7), trace)
    ga = [s for s in trace.steps if s[2] == 1]
    assert len(ga) == 2 and all(s[3] > 0 for s in ga)
    assert trace.steps[-1][4]["ga_steps_skipped_total"] == 4


def test_ga_lr_scale_multiplies_the_update_learning_rate():
    from neoxt.train.objectives.base import StepOutcome
    from neoxt.train.precision import LossScaler
    from neoxt.train.step import StepCounters, Stepper

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Scaled:
        parts = [model]

        def train_batch(self, micro, loss_scale):
            model(torch.ones(1, 2)).sum().backward()
            return StepOutcome(loss=torch.tensor(1.0, dtype=torch.float64), lr_scale=3.0)

    before = model.weight.detach().clone()
    stepper = Stepper(Scaled(), [opt], LossScaler.from_config(tiny_config().training), tiny_config(), StepCounters(),
                      lambda: 1.0)
    stepper.step([], lr=0.1)
    assert torch.allclose(before - model.weight.detach(), torch.full((1, 2), 0.3))  # lr 0.1 x 3, gradient 1


@pytest.mark.parametrize("mode", ["interval", "interleaved"])
def test_kill_and_resume_mid_run_gives_identical_losses(tmp_path, sets, mode):
    forget, retain = sets
    u = UnlearningConfig(ga_dataset=forget, gd_mode=True, gd_retain_dataset=retain, gd_retain_weight=2.0,
                         ga_mode=mode, ga_interval=3, ga_iters=2, ga_interleave_ratio=1, ga_lr_scale=2.0,
                         ga_loss_threshold=0.5, ga_threshold_check_mode="ema")
    straight = with_checkpoint(_cfg(u, save=tmp_path / "a", train_iters=8), checkpoint_factor=3)
    ref, _ = _run(straight)
    cfg = with_checkpoint(straight, save=str(tmp_path / "b"))
    kill_after = 4  # interval: 3 LM steps, the checkpoint at 3, one update of the burst: killed mid-burst
    torch.manual_seed(0)
    first = train_killed_after(kill_after, cfg, "", data=TrainData(PatternSource(seed=3)),
                               model=Transformer(cfg.model), log=lambda m: None)
    assert latest_checkpoint(tmp_path / "b").name == "global_step3"
    second, _ = _run(cfg)
    assert second.start_iteration == 3 and second.iteration == 8
    done = len(ref.losses) - len(second.losses)  # the steps before the checkpoint
    assert first.losses[:done] + second.losses == ref.losses  # exact float equality


def test_losses_reach_metrics_jsonl_tensorboard_and_wandb(tmp_path, sets, monkeypatch, capsys):
    forget, retain = sets
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda d, step: logged.append((step, d)), finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    u = UnlearningConfig(ga_dataset=forget, ga_mode="interleaved", gd_mode=True, gd_retain_dataset=retain)
    cfg = _cfg(u, save=tmp_path / "run", train_iters=4)
    cfg = replace(cfg, logging=replace(cfg.logging, tensorboard_dir=str(tmp_path / "tb"), use_wandb=True))
    _run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gd = [r for r in records if r.get("batch_type") == 2.0]
    assert [r["iteration"] for r in gd] == [3]
    assert gd[0]["loss"] is None  # an unlearning step is not an lm_loss
    assert {"gd_forget_loss", "gd_retain_loss", "gd_combined_loss"} <= gd[0].keys()
    line = next(x for x in capsys.readouterr().out.splitlines() if "iteration        3/" in x)
    assert "gd_forget_loss" in line and "gd_retain_loss" in line and "gd_combined_loss" in line
    assert any(step == 3 and "train/gd_forget_loss" in d for step, d in logged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/gd_forget_loss", "train/gd_retain_loss", "train/gd_combined_loss"} <= set(events.Tags()["scalars"])


def test_unlearning_is_one_objective_file_registered_in_one_line_and_the_loop_does_not_know_it():
    import inspect

    import neoxt.train.loop
    import neoxt.train.setup
    import neoxt.train.step
    from neoxt.train import objectives
    from neoxt.train.objectives.unlearning import UnlearningObjective, unlearning_enabled

    assert (unlearning_enabled, UnlearningObjective) in objectives.COMPOSED
    register = [line for line in inspect.getsource(objectives).splitlines() if "UnlearningObjective)" in line]
    assert len(register) == 1
    for module in (neoxt.train.loop, neoxt.train.step, neoxt.train.setup):
        source = inspect.getsource(module).lower()
        assert not any(word in source for word in ("unlearn", "ga_", "gd_", "forget", "retain")), module.__name__


@pytest.mark.parametrize("change, match", [
    (dict(gd_mode=True), "gd_retain_dataset"),
    (dict(ga_mode="interval"), "ga_interval"),
    (dict(ga_interleave_ratio=0), "ga_interleave_ratio"),
])
def test_inconsistent_keys_are_config_errors(sets, change, match):
    u = replace(UnlearningConfig(ga_dataset=sets[0], ga_mode="interleaved"), **change)
    with pytest.raises(ConfigError, match=match):
        _run(_cfg(u, train_iters=2))
    ok = _cfg(UnlearningConfig(ga_dataset=sets[0], ga_mode="interleaved"), train_iters=2)
    with pytest.raises(ConfigError, match="train_impl: normal"):
        _run(replace(ok, training=replace(ok.training, train_impl="dpo")))
    with pytest.raises(ConfigError, match="pipe_parallel_size"):
        _run(replace(ok, parallelism=replace(ok.parallelism, pipe_parallel_size=2)))


@pytest.mark.slow
@pytest.mark.distributed
def test_neoxt_train_gradient_difference_two_processes_match_one(tmp_path, corpus_dataset, sets):
    """The fork's keys through `neoxt train` (YAML), FSDP2 over 2 gloo processes == 1 process."""
    from conftest import run_neoxt_train

    tok, prefix = corpus_dataset
    forget, retain = sets

    def run(name: str, nproc: int, micro: int) -> list[dict]:
        cfg = {
            "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
            "max_position_embeddings": 64, "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}},
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2, "train_iters": 6,
            "data_path": prefix, "split": "100,0,0", "tokenizer_type": "HFTokenizer", "eval_iters": 0,
            "vocab_file": tok.vocab_file, "save": str(tmp_path / name), "log_interval": 1, "seed": 3,
            "index_cache_dir": str(tmp_path / f"cache-{name}"),
            "ga_dataset": forget, "ga_dataset_impl": "mmap", "ga_mode": "interleaved", "ga_interleave_ratio": 1,
            "gd_mode": True, "gd_retain_dataset": retain, "gd_retain_dataset_impl": "mmap", "gd_retain_weight": 2.0,
            "gd_log_separate_losses": True, "ga_lr_scale": 2.0,
        }
        run_neoxt_train(cfg, tmp_path / f"{name}.yml", nproc)
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one, two = run("one", 1, 4), run("two", 2, 2)
    assert [r.get("batch_type") for r in one] == [0.0, 0.0, 2.0, 0.0, 2.0, 0.0]
    for key in ("loss", "gd_forget_loss", "gd_retain_loss", "gd_combined_loss"):
        a, b = [r.get(key) for r in one], [r.get(key) for r in two]
        assert [x is None for x in a] == [x is None for x in b], key
        assert [x for x in b if x is not None] == pytest.approx([x for x in a if x is not None], rel=1e-4), key
