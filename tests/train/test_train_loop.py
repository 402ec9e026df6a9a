"""The loop on in-memory data: exact resume, accumulation invariance, masked windows, NaN policy."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from trainkit import PatternSource, tiny_config, train_killed_after, with_checkpoint

from neoxt.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from neoxt.train.loop import train
from neoxt.train.setup import TrainData
from neoxt.train.step import TrainingStopped


def _weights(path):
    from neoxt.model import Transformer
    from neoxt.train.checkpointer import load_weights

    model = Transformer(tiny_config().model)
    load_weights(path, model)
    return model.state_dict()


def test_exact_resume_is_bit_identical(tmp_path):
    """8 steps straight == 5 steps (checkpoint at 4, then 'killed') + resume to 8: losses and weights."""
    straight = tiny_config(save=tmp_path / "a", train_iters=8, gradient_accumulation_steps=2)
    straight = with_checkpoint(straight, checkpoint_factor=4)
    ref = train(straight, "", data=TrainData(PatternSource(seed=3), PatternSource(seed=9)))

    cfg = replace(straight, checkpoint=replace(straight.checkpoint, save=str(tmp_path / "b")))
    first = train_killed_after(5, cfg, "", data=TrainData(PatternSource(seed=3), PatternSource(seed=9)))
    assert first.status == "killed" and first.iteration == 5
    assert latest_checkpoint(tmp_path / "b").name == "global_step4"
    lines = []
    second = train(cfg, "", data=TrainData(PatternSource(seed=3), PatternSource(seed=9)), log=lines.append)
    assert lines[0].startswith("resuming from") and "global_step4" in lines[0]
    assert second.start_iteration == 4 and second.iteration == 8
    assert first.losses[:4] + second.losses == ref.losses  # exact float equality
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert read_meta(latest_checkpoint(tmp_path / "b"))["consumed_samples"] == 8 * 4


class Regroup:
    """Serve the sequences of a 1-sequence source in micro-batches of ``m`` (same global batches)."""

    def __init__(self, m, **kw):
        self.src, self.m = PatternSource(micro_batch=1, **kw), m

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(self.src) for _ in range(self.m)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self):
        return self.src.state_dict()

    def load_state_dict(self, sd):
        self.src.load_state_dict(sd)


def test_gradient_accumulation_does_not_change_the_result():
    losses = {}
    for micro, acc in ((4, 1), (2, 2), (1, 4)):
        cfg = tiny_config(train_iters=3, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=acc)
        # every 3rd sequence fully masked: uneven token counts across micro-batches
        losses[micro] = train(cfg, "", data=TrainData(Regroup(micro, empty_label_every=3)), log=lambda m: None).losses
    assert all(math.isfinite(x) for x in losses[1])
    for micro in (2, 1):
        assert losses[micro] == pytest.approx(losses[4], rel=1e-5, abs=1e-6)


class Scripted:
    """Serve fixed micro-batches in order (stateful position)."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]


def test_all_masked_micro_batch_adds_zero_gradient():
    """(real batch, all -100 batch) with accumulation 2 == the real batch alone: same update."""
    real = next(PatternSource(seed=1))
    empty = {k: v.clone() for k, v in real.items()}
    empty["labels"][:] = -100
    empty["loss_mask"][:] = 0
    base = tiny_config(train_iters=1)
    base = replace(base, optimizer=replace(base.optimizer, optimizer_type="sgd", weight_decay=0.0, gradient_clipping=0.0))
    from neoxt.model import Transformer

    results = []
    for batches, acc in (([real, empty], 2), ([empty, real], 2), ([real], 1)):
        torch.manual_seed(0)
        model = Transformer(base.model)
        cfg = replace(base, training=replace(base.training, gradient_accumulation_steps=acc))
        r = train(cfg, "", data=TrainData(Scripted(batches)), model=model, log=lambda m: None)
        assert math.isfinite(r.losses[0])
        results.append((r.losses[0], model.state_dict()))
    for loss, sd in results[:2]:
        assert loss == pytest.approx(results[2][0], rel=1e-6)
        for k, v in sd.items():
            assert torch.allclose(v, results[2][1][k], atol=1e-7), k


def _nan_at(model, calls):
    """Make the model's output NaN on the given forward calls (0-based)."""
    count = {"n": 0}

    def hook(module, args, output):
        n = count["n"]
        count["n"] += 1
        return output * float("nan") if n in calls else output

    model.register_forward_hook(hook)


def test_injected_nan_in_bf16_is_counted_and_skipped(tmp_path):
    from neoxt.model import Transformer

    cfg = tiny_config(save=tmp_path, train_iters=6, gradient_accumulation_steps=2, precision="bf16")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    _nan_at(model, {4})  # step 3, first micro-batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = train(cfg, "", data=TrainData(PatternSource()), model=model, log=lambda m: None)
    assert r.iteration == 6 and r.nan_count == 1
    assert math.isnan(r.losses[2]) and all(math.isfinite(x) for i, x in enumerate(r.losses) if i != 2)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[2]["nan_count"] == 1 and records[-1]["nan_count"] == 1
    assert set(records[0]) >= {"iteration", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "nan_count", "time"}
    hb = json.loads((tmp_path / "heartbeat.json").read_text())
    assert hb["status"] == "finished" and hb["iteration"] == 6 and hb["train_iters"] == 6 and hb["pid"] > 0


def test_on_nan_stop_saves_last_good_state_and_resumes(tmp_path):
    from neoxt.model import Transformer

    cfg = tiny_config(save=tmp_path, train_iters=6, gradient_accumulation_steps=1, on_nan="stop")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    _nan_at(model, {3})
    with pytest.raises(TrainingStopped, match="iteration 4"):
        train(cfg, "", data=TrainData(PatternSource()), model=model, log=lambda m: None)
    assert latest_checkpoint(tmp_path).name == "global_step3"
    assert json.loads((tmp_path / "heartbeat.json").read_text())["status"] == "failed"
    # Resuming (a fixed model) replays the batch that failed and finishes.
    r = train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)
    assert r.start_iteration == 3 and r.iteration == 6 and r.nan_count == 1


def test_on_nan_skip_gives_up_after_max_consecutive_nan_keeping_the_last_finite_checkpoint(tmp_path):
    """Issue 12: a run that keeps producing NaN under on_nan: skip stops (FAILED, TrainingStopped → exit 2)
    after max_consecutive_nan steps in a row instead of saving and saying "finished"; an isolated NaN
    only resets the streak."""
    from neoxt.model import Transformer

    cfg = tiny_config(save=tmp_path, train_iters=12, gradient_accumulation_steps=1, max_consecutive_nan=3)
    cfg = with_checkpoint(cfg, checkpoint_factor=2)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    _nan_at(model, {1, 4, 5, 6, 7, 8})  # step 2 alone (streak reset by step 3), then steps 5, 6, 7: give up
    with pytest.raises(TrainingStopped, match="3 consecutive non-finite steps up to iteration 7"):
        train(cfg, "", data=TrainData(PatternSource()), model=model, log=lambda m: None)
    # global_step6 was saved mid-streak (after NaN steps 5 and 6); latest goes back to global_step4.
    assert latest_checkpoint(tmp_path).name == "global_step4"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["global_step2", "global_step4", "global_step6"]
    hb = json.loads((tmp_path / "heartbeat.json").read_text())
    assert hb["status"] == "failed" and hb["nan_count"] == 4

    base = train(
        with_checkpoint(tiny_config(save=tmp_path / "base", train_iters=3), checkpoint_factor=3),
        "", data=TrainData(PatternSource(seed=5)), log=lambda m: None,
    )
    assert base.iteration == 3
    cfg = with_checkpoint(
        tiny_config(save=tmp_path / "ft", train_iters=10),
        load=str(tmp_path / "base"), finetune=True, iteration=3, checkpoint_factor=2,
    )
    lines = []
    first = train_killed_after(3, cfg, "", data=TrainData(PatternSource(seed=1)), log=lines.append)
    assert lines[0].startswith("finetuning from") and first.start_iteration == 0  # GPT-NeoX: counter reset
    assert latest_checkpoint(tmp_path / "ft").name == "global_step2"

    lines.clear()
    second = train(cfg, "", data=TrainData(PatternSource(seed=1)), log=lines.append)
    assert lines[0].startswith("resuming from") and "ignored" in lines[0]
    assert second.start_iteration == 2 and second.iteration == 10

    # Optimizer state was restored: a straight finetune run gives the same losses from step 5 on.
    ref = train(with_checkpoint(cfg, save=str(tmp_path / "ref")), "", data=TrainData(PatternSource(seed=1)), log=lambda m: None)
    assert ref.losses[2:] == second.losses


def test_extra_save_iters_zero_keep_last_n_and_no_save_optim(tmp_path):
    cfg = with_checkpoint(
        tiny_config(save=tmp_path, train_iters=6),
        extra_save_iters=(0,), checkpoint_factor=2, keep_last_n_checkpoints=2, no_save_optim=True,
    )
    lines = []
    train(cfg, "", data=TrainData(PatternSource()), log=lines.append)
    assert any("no_save_optim" in m for m in lines)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["global_step4", "global_step6"]
    assert any("removed old checkpoint" in m and "global_step0" in m for m in lines)
    assert "optimizer" not in read_meta(tmp_path / "global_step6")["state_keys"]


def test_loss_falls_by_more_than_ten_percent_in_100_iterations():
    cfg = tiny_config(train_iters=100, gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=4)
    r = train(cfg, "", data=TrainData(PatternSource(micro_batch=4)), log=lambda m: None)
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)


def test_fp16_dynamic_loss_scaling_runs_and_reports_scale(tmp_path):
    cfg = tiny_config(save=tmp_path, train_iters=4, precision="fp16", initial_scale_power=8)
    r = train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)
    assert r.iteration == 4 and all(math.isfinite(x) for x in r.losses)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss_scale"] == 256.0


def test_tensorboard_events_written(tmp_path):
    cfg = tiny_config(train_iters=2)
    cfg = replace(cfg, logging=replace(cfg.logging, tensorboard_dir=str(tmp_path / "tb")))
    train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_wandb_missing_is_a_clear_config_error(monkeypatch):
    import builtins

    from neoxt.errors import ConfigError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = tiny_config(train_iters=1)
    cfg = replace(cfg, logging=replace(cfg.logging, use_wandb=True))
    with pytest.raises(ConfigError, match=r"wandb.*neoxt\[wandb\]"):
        train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)


def test_unsupported_train_impl_fails_clearly():
    from neoxt.errors import ConfigError

    cfg = tiny_config(train_iters=1, train_impl="rm")
    with pytest.raises(ConfigError, match="train_impl"):
        train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)


def test_resume_restores_counters_and_reports_schedule_change(tmp_path):
    from neoxt.model import Transformer

    cfg = with_checkpoint(tiny_config(save=tmp_path, train_iters=4), checkpoint_factor=2)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    _nan_at(model, {1})
    first = train_killed_after(2, cfg, "", data=TrainData(PatternSource()), model=model, log=lambda m: None)
    assert first.nan_count == 1
    longer = replace(cfg, training=replace(cfg.training, train_iters=6))
    lines = []
    r = train(longer, "", data=TrainData(PatternSource()), log=lines.append)
    assert r.nan_count == 1 and r.iteration == 6
    assert any("differs from the checkpoint" in m for m in lines)
    kept = replace(longer, schedule=replace(longer.schedule, use_checkpoint_lr_scheduler=True))
    lines.clear()
    train(with_checkpoint(kept, save=str(tmp_path)), "", data=TrainData(PatternSource()), log=lines.append)
    assert not any("differs" in m for m in lines)


def test_exit_interval_saves_and_stops_then_rerun_continues(tmp_path):
    cfg = tiny_config(save=tmp_path, train_iters=7, exit_interval=3)
    r1 = train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)
    assert r1.status == "exit_interval" and r1.iteration == 3
    assert latest_checkpoint(tmp_path).name == "global_step3"
    assert json.loads((tmp_path / "heartbeat.json").read_text())["status"] == "interrupted"
    r2 = train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)
    assert r2.start_iteration == 3 and r2.iteration == 6
    r3 = train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)
    assert r3.status == "finished" and r3.iteration == 7


def test_resume_with_a_different_model_shape_is_a_checkpoint_error(tmp_path):
    from neoxt.errors import CheckpointError

    train(tiny_config(save=tmp_path, train_iters=2), "", data=TrainData(PatternSource()), log=lambda m: None)
    wider = tiny_config(save=tmp_path, train_iters=4)
    wider = replace(wider, model=replace(wider.model, intermediate_size=96))
    with pytest.raises(CheckpointError, match=r"global_step2.*mlp"):
        train(wider, "", data=TrainData(PatternSource()), log=lambda m: None)


def test_resume_with_a_different_architecture_field_is_refused_naming_it(tmp_path):
    """Issue 12: same shapes, other function (norm type): refused before anything loads, naming the field."""
    from neoxt.config import config_to_yaml
    from neoxt.errors import CheckpointError

    cfg = tiny_config(save=tmp_path, train_iters=2)
    train(cfg, config_to_yaml(cfg), data=TrainData(PatternSource()), log=lambda m: None)
    rms = tiny_config(save=tmp_path, train_iters=4)
    rms = replace(rms, model=replace(rms.model, norm="rmsnorm", use_bias_in_norms=False))
    with pytest.raises(CheckpointError, match=r"global_step2/config.yml: model field 'norm' is 'layernorm' in the "
                                              r"checkpoint but 'rmsnorm' in the config"):
        train(rms, config_to_yaml(rms), data=TrainData(PatternSource()), log=lambda m: None)
    assert latest_checkpoint(tmp_path).name == "global_step2"
    more_dropout = replace(cfg, model=replace(cfg.model, hidden_dropout=0.1), training=replace(cfg.training, train_iters=3))
    assert train(more_dropout, config_to_yaml(more_dropout), data=TrainData(PatternSource()), log=lambda m: None).iteration == 3


def test_metrics_never_repeat_an_iteration_after_a_crash_and_resume(tmp_path):
    """Issue 12: steps logged after the last checkpoint by a crashed run are replayed by the resumed run;
    metrics.jsonl keeps each iteration once (the replayed values)."""
    cfg = with_checkpoint(tiny_config(save=tmp_path, train_iters=7), checkpoint_factor=3)
    train_killed_after(5, cfg, "", data=TrainData(PatternSource()), log=lambda m: None)  # saved at 3, logged 1..5
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')  # a line torn by the crash
    r = train(cfg, "", data=TrainData(PatternSource()), log=lambda m: None)
    assert r.start_iteration == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [rec["iteration"] for rec in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[3]["loss"] == pytest.approx(r.losses[0])


def test_plain_load_resumes_fully_into_a_new_save_dir(tmp_path):
    """load without finetune = exact resume from that checkpoint (iteration picks global_step<N>)."""
    a = with_checkpoint(tiny_config(save=tmp_path / "a", train_iters=6), checkpoint_factor=2)
    ref = train(a, "", data=TrainData(PatternSource()), log=lambda m: None)
    b = with_checkpoint(a, save=str(tmp_path / "b"), load=str(tmp_path / "a"), iteration=4)
    lines = []
    r = train(b, "", data=TrainData(PatternSource()), log=lines.append)
    assert lines[0].startswith(f"resuming from {tmp_path / 'a' / 'global_step4'}")
    assert r.start_iteration == 4 and r.losses == ref.losses[4:]
    assert latest_checkpoint(tmp_path / "b").name == "global_step6"


def test_signal_recorded_before_the_first_step_stops_without_a_save(tmp_path):
    """A SIGUSR1 caught by the early-installed flag (neoxt train installs it before loading anything)
    ends the run before its first step: status "signal", no step, no checkpoint, the process alive."""
    import os
    import signal

    from neoxt.train.signals import SignalFlag

    flag = SignalFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.received == signal.SIGUSR1
        lines: list[str] = []
        r = train(tiny_config(tmp_path / "run"), "", data=TrainData(PatternSource()), log=lines.append, signals=flag)
    finally:
        flag.restore()
    assert r.status == "signal" and r.iteration == 0 and r.losses == []
    assert latest_checkpoint(tmp_path / "run") is None
    assert any("received signal SIGUSR1 before the first step" in x for x in lines), lines
    assert signal.getsignal(signal.SIGUSR1) is not flag._handle  # given back


def test_rng_source_when_the_checkpoint_had_fewer_or_more_ranks():
    """Every rank picks the same fallback from the DCP metadata keys: its own state when saved,
    otherwise rank 0's; the ranks without their own state are listed (logged once by rank 0)."""
    from neoxt.train.checkpointer import rng_source

    one = {"model.w", "rng.rank0.python", "rng.rank0.torch", "data.train.served"}
    assert rng_source(one, 0, 2) == (0, [1])
    assert rng_source(one, 1, 2) == (0, [1])
    two = one | {"rng.rank1.python", "rng.rank1.torch"}
    assert rng_source(two, 1, 2) == (1, [])
    assert rng_source(two, 0, 1) == (0, [])
    assert rng_source({"model.w"}, 1, 2) == (None, [0, 1])
