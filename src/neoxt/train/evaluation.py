"""Evaluation during training: the validation loss every ``eval_interval`` iterations, and GPT-NeoX's
``eval_tasks`` through the same lm-eval adapter as ``neoxt eval``.

Both run under a forked RNG so that evaluating (dropout off, but data sampling, lm-eval's own
draws) never changes the training run that follows: a run with evaluation has the same losses
as one without.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neoxt.config.schema import RunConfig
from neoxt.train.objectives import Objective
from neoxt.train.watchdog import keep_alive, suspended


def move(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A micro-batch's tensors on ``device``."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class _EvalMode:
    """Puts ``parts`` in eval mode for a ``with`` block and restores their previous modes."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts
        self.modes = [p.training for p in parts]

    def __enter__(self) -> None:
        for p in self.parts:
            p.eval()

    def __exit__(self, *exc: object) -> None:
        for p, mode in zip(self.parts, self.modes, strict=True):
            p.train(mode)


@torch.no_grad()
def validate(objective: Objective, source: Any, iters: int, cfg: RunConfig,
             device: torch.device) -> tuple[float, int, dict[str, float]]:
    """(validation loss, counted tokens, extra metrics) over ``iters`` global batches: the mean of the
    batches' losses weighted by their ``StepOutcome.weight`` (counted tokens for the LM loss: the mean
    over every counted token; one per batch for DPO/KTO), and each ``StepOutcome.metrics`` entry
    (e.g. a reward model's accuracy) averaged with the same weights."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    weight, tokens = 0.0, 0
    sums: dict[str, float] = {}
    acc = cfg.training.gradient_accumulation_steps
    with _EvalMode(objective.parts), torch.random.fork_rng(devices=[]):
        for _ in range(iters):
            keep_alive("validation")  # each batch is progress for the step watchdog
            outcome = objective.eval_batch([move(next(source), device) for _ in range(acc)])
            total += outcome.loss.double() * outcome.weight
            weight += outcome.weight
            tokens += outcome.tokens
            for name, value in outcome.metrics.items():
                sums[name] = sums.get(name, 0.0) + value * outcome.weight
    metrics = {name: value / weight for name, value in sums.items()} if weight else {}
    return ((total / weight).item() if weight else 0.0), tokens, metrics


def eval_tasks(model: nn.Module, cfg: RunConfig, iteration: int, rank: int) -> dict[str, float]:
    """GPT-NeoX's ``eval_tasks`` during training: lm-eval through the same adapter as ``neoxt eval``.

    Every rank runs it (a sharded model's forwards are collective); rank 0 writes lm-eval's JSON
    into the run directory."""
    from neoxt.evaluate.harness import eval_during_training
    from neoxt.tokenizer import load_tokenizer

    out_dir = cfg.checkpoint.save or cfg.logging.log_dir
    # lm-eval runs many forwards with no hook between them: not timed by the step watchdog.
    with _EvalMode([model]), torch.random.fork_rng(devices=[]), suspended("eval_tasks"):
        return eval_during_training(model, load_tokenizer(cfg.tokenizer), cfg, iteration, out_dir if rank == 0 else None)


class Evaluator:
    """Runs validation and eval tasks when ``eval_interval`` says; the loop calls ``maybe_run`` each step."""

    def __init__(self, cfg: RunConfig, objective: Objective, valid: Any, device: torch.device, metrics: Any, rank: int):
        self.cfg, self.objective, self.valid, self.device, self.metrics, self.rank = cfg, objective, valid, device, metrics, rank

    def maybe_run(self, iteration: int) -> None:
        t = self.cfg.training
        if not t.eval_interval or iteration % t.eval_interval:
            return
        if self.valid is not None:
            loss, tokens, extra = validate(self.objective, self.valid, t.eval_iters, self.cfg, self.device)
            self.metrics.record_eval(iteration, loss, tokens, extra)
        if self.cfg.evaluation.eval_tasks and self.objective.model is not None:
            self.metrics.record_task_scores(iteration, eval_tasks(self.objective.model, self.cfg, iteration, self.rank))
