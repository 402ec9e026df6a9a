"""The training loop: draw a global batch, step the objective, evaluate, save, stop.

Everything else has its own module: ``setup.py`` builds the run, ``objectives/`` computes losses
and gradients (the loop never branches on ``train_impl``), ``step.py`` unscales, clips and applies
the NaN / fp16-overflow policy, ``checkpointer.py`` decides where a run starts and saves/restores
it exactly, ``evaluation.py`` runs validation and eval tasks, ``metrics.py`` reports.

A run stops when ``train_iters`` is reached, at an ``exit_interval`` multiple (saved), on SIGTERM /
SIGUSR1 (saved after the current step; before the first step nothing is saved: nothing changed),
or with ``TrainingStopped`` under ``on_nan: stop`` (the last good state saved). Under several ranks,
``watchdog.py`` ends the process when a step makes no progress for ``step_timeout_s`` (a hung peer).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neoxt.config.schema import RunConfig
from neoxt.train.evaluation import Evaluator, move
from neoxt.train.metrics import StepStats
from neoxt.train.setup import Run, TrainData, check_config, resolve_vocab, setup
from neoxt.train.signals import SignalFlag
from neoxt.train.step import StepResult, TrainingStopped
from neoxt.train.watchdog import Watchdog, for_run

# Called after every step with (iteration after the step, its result); for instrumentation. An
# exception raised here ends ``train`` at once, without a save, as a crash would (tests use that).
StepCallback = Callable[[int, StepResult], None]


@dataclass
class TrainResult:
    iteration: int
    status: str  # "finished" | "signal" | "exit_interval"
    start_iteration: int
    losses: list[float] = field(default_factory=list)  # per step, in order (NaN for skipped steps)
    last_checkpoint: Path | None = None
    nan_count: int = 0
    resumed_from: Path | None = None


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank: every rank must take the same branch before a
    collective checkpoint save (torchrun forwards a signal to each rank at a slightly different time)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _signal_name(signals: SignalFlag) -> str:
    return signal.Signals(signals.received).name if signals.received else "a signal (another rank)"


def _step(run: Run, result: TrainResult) -> StepResult:
    """One global batch through the objective and the optimizers; accounts and logs it."""
    t0 = time.perf_counter()
    p, acc = run.progress, run.cfg.training.gradient_accumulation_steps
    data_before = run.data.train.state_dict()
    micro = [move(next(run.data.train), run.device) for _ in range(acc)]
    lr = run.schedule.lr_at(p.iteration)
    r = run.stepper.step(micro, lr)
    if r.stop:  # on_nan: stop. Weights and optimizer are untouched; rewind the data to this step's start.
        run.metrics.nan_count = run.counters.nan_count
        path = run.checkpointer.save(run.schedule, data_before, wait=True)
        where = f"; last good state saved to {path}" if path else ""
        raise TrainingStopped(f"non-finite {r.describe_stop()} at iteration {p.iteration + 1} (on_nan: stop){where}")
    if r.give_up:  # on_nan: skip, max_consecutive_nan reached: the weights are the last finite step's
        run.metrics.nan_count = run.counters.nan_count
        last = run.checkpointer.keep_last_finite() or run.resumed_from
        kept = f"; 'latest' names the last checkpoint saved after a finite step, {last}" if last else ""
        raise TrainingStopped(f"{r.give_up} consecutive non-finite steps up to iteration {p.iteration + 1} "
                              f"(on_nan: skip, max_consecutive_nan: {run.cfg.training.max_consecutive_nan}): "
                              f"the run is diverging; stopped without saving{kept}")
    p.iteration += int(r.advance)
    tokens = sum(int(b["tokens"].numel()) for b in micro) * run.dp_size * run.cp_size
    p.consumed_tokens += tokens
    p.consumed_samples += sum(int(b["tokens"].shape[0]) for b in micro) * run.dp_size
    result.losses.append(r.loss if not r.skipped else float("nan"))
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    fp16 = run.cfg.training.precision == "fp16"
    stats = StepStats(iteration=p.iteration, loss=r.loss, lr=lr, grad_norm=r.grad_norm, tokens=tokens,
                      seconds=time.perf_counter() - t0, skipped=r.skipped,
                      loss_scale=run.stepper.scaler.scale if fp16 else None, extra=r.metrics,
                      in_loss=r.in_loss)
    run.metrics.record(stats, r.nan)
    return r


def _loop(run: Run, signals: SignalFlag, result: TrainResult, on_step: Sequence[StepCallback],
          say: Callable[[str], None], dog: Watchdog) -> str:
    """Steps until done; returns the heartbeat status and sets ``result.status``.

    ``dog`` hears of each step's start and is armed once the first one completed (compile and the
    first collectives may take long); checkpoint saves and evaluation report to it themselves."""
    t, p, saver = run.cfg.training, run.progress, run.checkpointer
    if _any_rank(signals.received is not None, run.device):
        # During start-up: nothing has changed since the state we started from, so no save.
        say(f"received signal {_signal_name(signals)} before the first step: exiting at iteration "
            f"{p.iteration} without saving (nothing new to save)")
        result.status = "signal"
        return "interrupted"
    if p.iteration in saver.save_iters and run.resumed_from is None:
        saver.save(run.schedule)  # e.g. extra_save_iters: [0] keeps the base model
    evaluator = Evaluator(run.cfg, run.objective, run.data.valid, run.device, run.metrics, run.rank)
    while p.iteration < t.train_iters:
        dog.pet(p.iteration + 1)
        r = _step(run, result)
        dog.arm()
        if r.advance:
            evaluator.maybe_run(p.iteration)
            if _any_rank(signals.received is not None, run.device):
                saver.save(run.schedule)
                say(f"received signal {_signal_name(signals)}: saved at iteration {p.iteration}, exiting")
                result.status = "signal"
                return "interrupted"
            if saver.should_save(p.iteration):
                saver.save(run.schedule)
        for callback in on_step:
            callback(p.iteration, r)
        if r.advance and t.exit_interval and p.iteration % t.exit_interval == 0 and p.iteration < t.train_iters:
            say(f"exit_interval {t.exit_interval}: stopping at iteration {p.iteration}")
            result.status = "exit_interval"
            return "interrupted"
    return "finished"


def _watchdog(run: Run, say: Callable[[str], None]) -> Watchdog:
    """The process's step watchdog (off for one process); when it fires on rank 0, the heartbeat says
    failed with its reason, so ``neoxt status`` shows FAILED instead of RUNNING."""
    from neoxt.distributed.mesh import rank_world

    dog = for_run(run.cfg.parallelism.step_timeout_s, run.rank, rank_world()[1],
                  on_fire=lambda stall: run.metrics.heartbeat(run.progress.iteration, "failed", stall.reason()))
    if dog.enabled:
        say(f"step watchdog: a rank whose step makes no progress for {dog.timeout_s:g} s exits "
            "(step_timeout_s; 0 turns it off)")
    return dog


def train(
    cfg: RunConfig,
    config_yaml: str | None = None,
    *,
    data: TrainData | None = None,
    model: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
    signals: SignalFlag | None = None,
    on_step: Sequence[StepCallback] = (),
) -> TrainResult:
    """Run (or continue) training as ``cfg`` says; ``neoxt.train.checkpointer`` says where it starts.

    ``data`` / ``model`` override what ``cfg`` would build (tests, benchmarks, post-training).
    ``signals``: a flag the caller installed early (``neoxt train`` does, first thing); a signal it
    recorded before the first step stops the run there, without a save (see ``SignalFlag``).
    ``on_step``: callbacks after each step (see ``StepCallback``).
    """
    from neoxt.checkpoint.lock import run_lock
    from neoxt.distributed.mesh import dist_env

    rank = dist_env().rank  # the process group is joined later, in setup
    say = log or (lambda msg: print(msg, flush=True) if rank == 0 else None)
    check_config(cfg)
    if model is None and cfg.model.padded_vocab_size is None:
        cfg = resolve_vocab(cfg)
        config_yaml = None  # the saved config must name the vocabulary size the weights have
    if config_yaml is None:
        from neoxt.config import config_to_yaml

        config_yaml = config_to_yaml(cfg)
    with run_lock(cfg.checkpoint.save, say, enabled=rank == 0):  # one run per save directory
        run = setup(cfg, config_yaml, data, model, say)
        p = run.progress
        result = TrainResult(iteration=p.iteration, status="finished", start_iteration=p.iteration,
                             resumed_from=run.resumed_from)
        status = "failed"
        own_signals = signals is None
        signals = (signals or SignalFlag()).install()
        dog = _watchdog(run, say)
        try:
            status = _loop(run, signals, result, on_step, say, dog.start())
        finally:
            dog.stop()
            try:
                run.checkpointer.close()  # an async save still being written completes before the run exits
            finally:
                if own_signals:
                    signals.restore()
                run.metrics.close(p.iteration, status)
    result.iteration, result.nan_count = p.iteration, run.counters.nan_count
    result.last_checkpoint = run.checkpointer.last
    if result.status == "finished":
        say(f"training finished at iteration {p.iteration}")
    return result
