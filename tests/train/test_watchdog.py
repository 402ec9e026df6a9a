"""The step watchdog (``neoxt.train.watchdog``): fires after ``step_timeout_s`` without progress while
armed, never while petted, suspended, not yet armed or disabled; one line naming rank, iteration and
phase, the stacks, the heartbeat marked failed, a distinct exit code. The config key is range-checked."""

from __future__ import annotations

import json
import threading
import time

import pytest

from neoxt.train import watchdog as wd
from neoxt.train.watchdog import EXIT_CODE, Stall, Watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _dog(tmp_path, timeout=10.0, **kw):
    clock, exits, stream = Clock(), [], open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115 (a real fd: faulthandler)
    dog = Watchdog(timeout, rank=1, world_size=2, exit=exits.append, clock=clock, stream=stream, **kw)
    return dog, clock, exits, stream


def _err(stream) -> str:
    stream.flush()
    stream.seek(0)
    return stream.read()


def test_fires_after_the_timeout_with_one_line_naming_rank_iteration_phase(tmp_path):
    seen = []
    dog, clock, exits, stream = _dog(tmp_path, on_fire=seen.append)
    dog.pet(3)
    dog.arm()
    clock.now += 9.9
    assert dog.check() is None and exits == []
    clock.now += 0.2
    stall = dog.check()
    assert stall == Stall(rank=1, world_size=2, iteration=3, phase="training step", waited_s=pytest.approx(10.1),
                          timeout_s=10.0)
    assert exits == [EXIT_CODE] and EXIT_CODE not in (0, 1, 2)
    assert seen == [stall]
    err = _err(stream)
    first = err.splitlines()[0]
    for part in ("rank 1 of 2", "iteration 3", "(training step)", "no progress for 10 s", "step_timeout_s",
                 "other ranks' logs", f"code {EXIT_CODE}"):
        assert part in first, first
    assert "most recent call first" in err and "test_watchdog.py" in err  # faulthandler: the stacks, this frame


def test_never_fires_while_petted_kept_alive_or_suspended(tmp_path):
    dog, clock, exits, _ = _dog(tmp_path)
    dog.arm()
    for it in range(1, 50):  # a healthy run: steps of 9 s against a 10 s timeout, for 7 minutes
        dog.pet(it)
        clock.now += 9.0
        assert dog.check() is None
    for _ in range(20):  # a long validation whose batches report progress
        dog.keep_alive("validation")
        clock.now += 9.0
        assert dog.check() is None
    with dog.suspended("checkpoint save"):  # a save far longer than a step
        clock.now += 1000.0
        assert dog.check() is None
        with dog.suspended("eval_tasks"):
            clock.now += 1000.0
            assert dog.check() is None
    clock.now += 9.0  # the timer restarted when the save ended
    assert dog.check() is None and exits == []
    clock.now += 2.0
    assert dog.check().phase == "validation"  # the phase before the suspension is back
    assert exits == [EXIT_CODE]


def test_not_armed_before_the_first_step_and_off_at_zero(tmp_path):
    dog, clock, exits, _ = _dog(tmp_path)
    dog.pet(1)  # the first step (compile, first collectives) may take long: not armed yet
    clock.now += 10_000
    assert dog.check() is None
    off, clock0, exits0, _ = _dog(tmp_path, timeout=0)
    off.arm()
    clock0.now += 10_000
    assert off.check() is None and not off.enabled and exits == exits0 == []
    assert off.start()._thread is None  # a disabled watchdog starts no thread
    assert not wd.for_run(600, 0, 1).enabled and wd.for_run(600, 0, 2).enabled  # a lone process: off


def test_the_thread_fires_in_real_time_and_module_functions_reach_it(tmp_path):
    fired = threading.Event()
    stream = open(tmp_path / "err.txt", "w+")  # noqa: SIM115
    dog = Watchdog(1.0, rank=0, world_size=2, exit=lambda code: fired.set(), stream=stream, poll_s=0.02)
    with dog:
        dog.pet(7, "training step")
        dog.arm()
        for _ in range(30):  # 1.5 s of progress reported through the module function
            time.sleep(0.05)
            wd.keep_alive()
        with wd.suspended("checkpoint save"):
            time.sleep(1.5)
        assert not fired.is_set()
        t0 = time.monotonic()
        assert fired.wait(10.0)
        assert 0.9 < time.monotonic() - t0 < 5.0
    assert wd._ACTIVE is None
    assert "iteration 7 (training step)" in _err(stream).splitlines()[0]


def test_heartbeat_marked_failed_for_neoxt_status(tmp_path):
    """Rank 0's ``on_fire`` writes the heartbeat as failed with the reason: ``neoxt status`` says FAILED."""
    from neoxt.ops.status import run_status
    from neoxt.train.metrics import MetricsLogger

    metrics = MetricsLogger(run_dir=tmp_path, train_iters=10, flops_per_token=0.0, peak_tflops=None)
    metrics.heartbeat(2, "running")
    dog, clock, exits, _ = _dog(tmp_path, on_fire=lambda s: metrics.heartbeat(2, "failed", s.reason()))
    dog.pet(3)
    dog.arm()
    clock.now += 11
    dog.check()
    beat = json.loads((tmp_path / "heartbeat.json").read_text())
    assert beat["status"] == "failed" and beat["iteration"] == 2
    assert beat["reason"].startswith("watchdog: rank 1 made no progress for 11 s in iteration 3")
    status = run_status(tmp_path, "run", {})
    assert status.verdict == "FAILED" and "watchdog" in status.reason


def test_a_failing_callback_does_not_stop_the_exit(tmp_path):
    def broken(stall):
        raise OSError("disk full")

    dog, clock, exits, stream = _dog(tmp_path, on_fire=broken)
    dog.arm()
    clock.now += 11
    dog.check()
    assert exits == [EXIT_CODE] and "could not mark the run failed: disk full" in _err(stream)


@pytest.mark.parametrize("value, problem", [("-1", "must be at least 0"), (".nan", "is not a number"),
                                            (".inf", "must be finite")])
def test_step_timeout_s_is_range_checked(tmp_path, capsys, value, problem):
    from neoxt.cli import main

    cfg = tmp_path / "bad.yml"
    cfg.write_text(f"num_layers: 2\nhidden_size: 32\nnum_attention_heads: 4\nseq_length: 16\n"
                   f"max_position_embeddings: 32\ntrain_iters: 10\nstep_timeout_s: {value}\n")
    assert main(["config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if "step_timeout_s" in ln]
    assert len(lines) == 1 and problem in lines[0] and "bad.yml" in lines[0], err


def test_step_timeout_s_reaches_the_config(tmp_path):
    from neoxt.config import load_config

    cfg = tmp_path / "ok.yml"
    cfg.write_text("num_layers: 2\nhidden_size: 32\nnum_attention_heads: 4\nstep_timeout_s: 30\n")
    par = load_config([cfg]).parallelism
    assert (par.step_timeout_s, par.dist_timeout_s) == (30, 1800)


class Recorder(Watchdog):
    """A watchdog that records what the training loop tells it (and would exit the test if it fired)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.events: list[tuple] = []

    def pet(self, iteration, phase="training step"):
        self.events.append(("pet", iteration))
        super().pet(iteration, phase)

    def arm(self):
        self.events.append(("arm",))
        super().arm()

    def keep_alive(self, phase=None):
        self.events.append(("alive", phase))
        super().keep_alive(phase)

    def suspended(self, phase):
        self.events.append(("suspend", phase))
        return super().suspended(phase)


def test_the_training_loop_pets_arms_and_suspends(tmp_path, monkeypatch):
    """In-process: pet at each step's start, armed only after the first step, validation batches keep it
    alive, checkpoint saves are not timed, stopped at the end (``for_run`` forced on for one process)."""
    from dataclasses import replace

    from trainkit import PatternSource, tiny_config, with_checkpoint

    from neoxt.train import loop
    from neoxt.train.setup import TrainData

    dogs = []

    def forced(timeout_s, rank, world_size, on_fire=None):
        dogs.append(Recorder(1000.0, rank, 2, on_fire=on_fire, exit=lambda code: pytest.fail("the watchdog fired")))
        return dogs[-1]

    monkeypatch.setattr(loop, "for_run", forced)
    cfg = with_checkpoint(tiny_config(tmp_path / "run", train_iters=4, eval_interval=2, eval_iters=1),
                          checkpoint_factor=2)
    cfg = replace(cfg, training=replace(cfg.training, gradient_accumulation_steps=1, train_batch_size=2))
    loop.train(cfg, "", data=TrainData(PatternSource(seed=1), PatternSource(seed=2)), log=lambda m: None)
    events = dogs[0].events
    assert events[:2] == [("pet", 1), ("arm",)]  # nothing armed it before the first step completed
    step = [("pet", 2), ("arm",), ("alive", "validation"), ("suspend", "checkpoint save")]
    assert events[2:6] == step and events[6:8] == [("pet", 3), ("arm",)]
    assert events[8:12] == [("pet", 4), ("arm",), ("alive", "validation"), ("suspend", "checkpoint save")]
    assert dogs[0]._stop.is_set() and wd._ACTIVE is None  # stopped before the run's closing wait
