"""Gradient ascent (GA) and gradient difference (GD) unlearning, composed with the LM objective.

The users' fork of GPT-NeoX (GeodesicResearch/geodesic-gpt-neox: ``ga_*`` / ``gd_*`` in
``neox_args.py``, the loop in ``training.py``) trains the ordinary LM objective and, on scheduled
steps, takes an *unlearning* update instead:

- GA: ascend the forget-set loss (minimise ``-L_forget``);
- GD (``gd_mode``): minimise ``gd_retain_weight * L_retain - L_forget`` on a forget batch and a
  retain batch (each ``L`` the mean token cross-entropy over its global batch);

at ``ga_lr_scale`` times the schedule's learning rate. On a MoE model the experts' balancing and
router z-losses are still descended on those steps (``objectives/base.accumulate``): ascending them
would unbalance the router, which is not what unlearning asks. When they happen (``ga_mode``):

- ``interval``: after every ``ga_interval``-th iteration (not after the last), a burst of
  ``ga_iters`` updates that do not advance the iteration counter, the LR schedule, or the checkpoint
  and evaluation triggers (``StepOutcome.advance = False``);
- ``interleaved``: iteration ``i`` (0-based, counted before the step) is an unlearning iteration when
  ``i > 0`` and ``i % (ga_interleave_ratio + 1) == 0`` (the fork's code: ratio R gives R LM
  iterations then one GA/GD iteration); it counts as an iteration and takes the place of that
  iteration's LM batch, as in the fork.

The forget (``ga_dataset``) and retain (``gd_retain_dataset``) sets are ordinary indexed datasets
(all documents, sampled like the train split, index maps sized as the fork sizes them) with their
own positions. The schedule, both positions and the threshold statistics live in the train batch
source (``UnlearningBatches``), so they are the checkpoint's ``data.train`` and resume exactly; no
LM batch is drawn on unlearning steps.

Threshold (``ga_loss_threshold``): an unlearning update is only applied while the checked forget
loss is above the threshold. The checked value is the step's forget loss (``per_step``), or an
exponential moving average of the forget losses (``ema``, weight 0.1 for the newest, as the fork).
Without ``ga_threshold_skip_forward`` the forward still runs (losses are logged, no gradient);
with it, a step whose EMA is already at or below the threshold is not run at all and the iteration
(interleaved) or the rest of the burst (interval) falls back to the LM step.

Where the fork's code is ambiguous or contradicts its own documentation, this follows the
documented meaning and says so:

- interval mode: the fork's burst replaces the LM step of the iteration it runs in and then counts
  as that iteration; here, as its ``ga_iters`` doc says, the burst does not count toward
  ``train_iters`` and every iteration still takes its LM step (also, each fork GA update advances
  DeepSpeed's LR scheduler; here the schedule stays put during a burst).
- GD without a pipeline: the fork's non-pipeline ``train_step`` drops ``gradient_difference`` and
  takes a plain descent step on the forget batch; only its pipeline path computes
  ``alpha * L_retain - L_forget``. Here GD always computes that documented loss.
- threshold: the fork checks after its backward and only counts the "skip" (its comment says the
  skip is not implemented); here the forward is measured first (without gradients) and the update
  is skipped. For GD the checked loss is the forget loss (the fork would compare the negated
  combined loss). The fork updates its EMA only in ``ema`` mode, so its ``per_burst`` check never
  fires; here the EMA is always kept and ``per_burst`` compares it once before each burst (in
  interleaved mode, which has no bursts, ``per_burst`` checks per step, as the fork's code does).
- ``ga_threshold_skip_forward`` in interleaved mode: the fork's comment says the iteration "falls
  through to the regular training step" but its code runs no step at all; here the LM step runs.

Logged (console line, ``metrics.jsonl``, TensorBoard/W&B as ``train/<name>``), with the fork's names:
``gd_combined_loss`` and, with ``gd_log_separate_losses``, ``gd_forget_loss`` / ``gd_retain_loss``
(GD); ``ga_actual_loss`` / ``ga_objective`` (GA); ``batch_type`` (0 LM, 1 GA, 2 GD); with a
threshold ``ga_steps_performed_total``, ``ga_steps_skipped_total``, ``ga_skip_rate``,
``ga_loss_ema``. Unlearning steps stay out of the ``lm_loss`` average (``in_loss = False``).
Not supported yet: other ``train_impl`` than ``normal`` and ``pipe_parallel_size > 1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from neoxt.config.schema import RunConfig, UnlearningConfig
from neoxt.errors import ConfigError
from neoxt.train.objectives.base import ObjectiveContext, StepOutcome
from neoxt.train.objectives.lm import LMObjective, accumulate_gradients

LM, GA, GD = "lm", "ga", "gd"
EMA_WEIGHT = 0.1  # the fork's EMA: 0.1 * newest + 0.9 * previous
RETAIN = "retain_"  # prefix of the retain micro-batch's keys inside a GD micro-batch

Micro = list[dict[str, torch.Tensor]]


def unlearning_enabled(cfg: RunConfig) -> bool:
    """Whether the config asks for gradient ascent / difference (then this objective wraps ``normal``)."""
    return cfg.unlearning.ga_dataset is not None or cfg.unlearning.gd_mode


def check_unlearning(cfg: RunConfig) -> None:
    """The keys' consistency, before anything is built (one line naming the key)."""
    u = cfg.unlearning
    if cfg.training.train_impl != "normal":
        raise ConfigError(f"ga_dataset / gd_mode compose with train_impl: normal, not '{cfg.training.train_impl}'")
    if cfg.parallelism.pipe_parallel_size > 1:
        raise ConfigError("ga_dataset / gd_mode are not supported with pipe_parallel_size > 1 yet")
    if u.ga_dataset is None:
        raise ConfigError("gd_mode: true needs ga_dataset (the forget set)")
    if u.gd_mode and u.gd_retain_dataset is None:
        raise ConfigError("gd_mode: true needs gd_retain_dataset (the retain set)")
    if u.ga_mode == "interval" and not (u.ga_interval and u.ga_interval > 0 and u.ga_iters and u.ga_iters > 0):
        raise ConfigError("ga_mode: interval needs positive ga_interval and ga_iters")
    if u.ga_mode == "interleaved" and u.ga_interleave_ratio < 1:
        raise ConfigError(f"ga_interleave_ratio must be at least 1, got {u.ga_interleave_ratio}")


def unlearning_iterations(u: UnlearningConfig, train_iters: int) -> int:
    """How many unlearning updates the run makes (the fork's sizing of the forget/retain index maps)."""
    if u.ga_mode == "interval":
        return (train_iters // int(u.ga_interval or 1)) * int(u.ga_iters or 0)
    return train_iters // (u.ga_interleave_ratio + 1)


@dataclass
class Plan:
    """Which kind of step comes next, and the threshold statistics (saved with the data position)."""

    iteration: int = 0  # iterations completed (the loop's counter, tracked here)
    burst_left: int = 0  # interval mode: unlearning updates left in the current burst
    current: str = LM  # the kind of the step being drawn / run
    ema: float = 0.0
    ema_set: bool = False
    performed: int = 0  # unlearning updates applied
    skipped: int = 0  # unlearning updates not applied (threshold)


class Scheduler:
    """Decides each step's kind (``begin``) and advances after it (``finish``); see the module doc."""

    def __init__(self, u: UnlearningConfig, train_iters: int, start_iteration: int):
        self.u, self.train_iters = u, train_iters
        self.plan = Plan(iteration=start_iteration)

    def below(self, value: float) -> bool:
        return self.u.ga_loss_threshold is not None and value <= self.u.ga_loss_threshold

    def _skip_without_forward(self) -> bool:
        return self.u.ga_threshold_skip_forward and self.plan.ema_set and self.below(self.plan.ema)

    def begin(self) -> str:
        """The kind of the step about to be drawn."""
        p, u = self.plan, self.u
        kind = GD if u.gd_mode else GA
        if u.ga_mode == "interval":
            due = p.burst_left > 0
            if due and self._skip_without_forward():
                p.skipped, p.burst_left, due = p.skipped + p.burst_left, 0, False
        else:
            due = p.iteration > 0 and p.iteration % (u.ga_interleave_ratio + 1) == 0
            if due and self._skip_without_forward():
                p.skipped, due = p.skipped + 1, False
        p.current = kind if due else LM
        return p.current

    def check_each_step(self) -> bool:
        """Whether this unlearning step measures its forget loss against the threshold first."""
        if self.u.ga_loss_threshold is None:
            return False
        return not (self.u.ga_threshold_check_mode == "per_burst" and self.u.ga_mode == "interval")

    def observe(self, forget_loss: float) -> float:
        """Fold a forget loss into the EMA; returns the value the threshold compares."""
        p = self.plan
        p.ema = forget_loss if not p.ema_set else EMA_WEIGHT * forget_loss + (1 - EMA_WEIGHT) * p.ema
        p.ema_set = True
        return p.ema if self.u.ga_threshold_check_mode == "ema" else forget_loss

    def advances(self) -> bool:
        return self.plan.current == LM or self.u.ga_mode == "interleaved"

    def finish(self) -> None:
        """After the step: count it, and start a burst after an ``ga_interval``-th iteration."""
        p, u = self.plan, self.u
        if not self.advances():
            p.burst_left -= 1
            return
        p.iteration += 1
        if u.ga_mode == "interval" and p.iteration % int(u.ga_interval or 1) == 0 and p.iteration < self.train_iters:
            if u.ga_loss_threshold is not None and u.ga_threshold_check_mode == "per_burst" and p.ema_set \
                    and self.below(p.ema):
                p.skipped += int(u.ga_iters or 0)
            else:
                p.burst_left = int(u.ga_iters or 0)


class UnlearningBatches:
    """The train source of an unlearning run: LM batches, or forget (+ retain) batches on the steps
    the ``Scheduler`` says; its state is all three positions plus the schedule."""

    def __init__(self, lm: Any, forget: Any, retain: Any | None, scheduler: Scheduler, accumulation: int):
        self.lm, self.forget, self.retain, self.scheduler = lm, forget, retain, scheduler
        self.accumulation, self.drawn = accumulation, 0

    def __iter__(self) -> UnlearningBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        kind = self.scheduler.begin() if self.drawn == 0 else self.scheduler.plan.current
        self.drawn = (self.drawn + 1) % self.accumulation
        if kind == LM:
            return next(self.lm)
        batch = dict(next(self.forget))
        if kind == GD:
            batch.update({RETAIN + k: v for k, v in next(self.retain).items()})
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = {"lm": self.lm.state_dict(), "forget": self.forget.state_dict(), "drawn": self.drawn,
                 "plan": asdict(self.scheduler.plan)}
        if self.retain is not None:
            state["retain"] = self.retain.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lm.load_state_dict(state["lm"])
        self.forget.load_state_dict(state["forget"])
        if self.retain is not None:
            self.retain.load_state_dict(state["retain"])
        self.drawn = int(state["drawn"])
        self.scheduler.plan = Plan(**{k: type(getattr(Plan(), k))(v) for k, v in state["plan"].items()})


class UnlearningObjective:
    """LM steps through ``LMObjective``; GA/GD steps on the forget (+ retain) batches."""

    check_config = staticmethod(check_unlearning)

    def __init__(self, ctx: ObjectiveContext):
        from neoxt.distributed.mesh import dp_rank_size

        cfg, u = ctx.cfg, ctx.cfg.unlearning
        self.cfg, self.u = cfg, u
        self.lm = LMObjective(ctx)
        self.model, self.parts, self.group = self.lm.model, self.lm.parts, ctx.group
        c = cfg.checkpoint
        start = int(c.iteration or 0) if (ctx.fresh_start and c.finetune and c.load) else 0
        self.scheduler = Scheduler(u, cfg.training.train_iters, start)
        self.dp_rank = dp_rank_size(ctx.mesh)[0]

    def train_source(self, lm: Any) -> UnlearningBatches:
        from neoxt.train.batches import open_indexed

        t, u = self.cfg.training, self.u
        samples = unlearning_iterations(u, t.train_iters) * t.train_batch_size
        assert u.ga_dataset is not None
        forget = open_indexed(self.cfg, u.ga_dataset, "gradient_ascent", samples, self.dp_rank)
        retain = None
        if u.gd_mode:
            assert u.gd_retain_dataset is not None
            retain = open_indexed(self.cfg, u.gd_retain_dataset, "gradient_diff_retain", samples, self.dp_rank)
        return UnlearningBatches(lm, forget, retain, self.scheduler, t.gradient_accumulation_steps)

    def _loss(self, micro: Micro, scale: float, backward: bool) -> torch.Tensor:
        return accumulate_gradients(self.model, micro, self.lm.precision, scale, 0.0, self.group, backward,
                                    chunk=self.lm.chunk)

    def _unlearn(self, micro: Micro, loss_scale: float) -> tuple[float, float | None, bool]:
        """(forget loss, retain loss or None, whether the update is applied) of one GA/GD step."""
        s = self.scheduler
        forget = [{k: v for k, v in b.items() if not k.startswith(RETAIN)} for b in micro]
        retain = [{k[len(RETAIN):]: v for k, v in b.items() if k.startswith(RETAIN)} for b in micro]
        apply = True
        if s.check_each_step():
            f = float(self._loss(forget, 1.0, backward=False))
            apply = not s.below(s.observe(f))
        if apply:
            f_grad = float(self._loss(forget, -loss_scale, backward=True))
            if not s.check_each_step():
                s.observe(f_grad)
            f = f_grad
        r = None
        if s.plan.current == GD:
            r = float(self._loss(retain, self.u.gd_retain_weight * loss_scale, backward=apply))
        s.plan.performed += int(apply)
        s.plan.skipped += int(not apply)
        return f, r, apply

    def _metrics(self, kind: str, f: float | None, r: float | None) -> dict[str, float]:
        u, p = self.u, self.scheduler.plan
        out: dict[str, float] = {"batch_type": {LM: 0.0, GA: 1.0, GD: 2.0}[kind]}
        if kind == GA and f is not None:
            out.update(ga_actual_loss=f, ga_objective=-f)
        if kind == GD and f is not None and r is not None:
            out["gd_combined_loss"] = u.gd_retain_weight * r - f
            if u.gd_log_separate_losses:
                out.update(gd_forget_loss=f, gd_retain_loss=r)
        if u.ga_loss_threshold is not None:
            attempts = p.performed + p.skipped
            out.update(ga_steps_performed_total=float(p.performed), ga_steps_skipped_total=float(p.skipped),
                       ga_skip_rate=p.skipped / attempts if attempts else 0.0)
            if p.ema_set:
                out["ga_loss_ema"] = p.ema
        return out

    def train_batch(self, micro: Micro, loss_scale: float) -> StepOutcome:
        s = self.scheduler
        kind, advance = s.plan.current, s.advances()
        if kind == LM:
            outcome = self.lm.train_batch(micro, loss_scale)
            outcome.metrics = {**outcome.metrics, **self._metrics(LM, None, None)}
            s.finish()
            return outcome
        f, r, _ = self._unlearn(micro, loss_scale)
        loss = -f if r is None else self.u.gd_retain_weight * r - f
        s.finish()
        return StepOutcome(loss=torch.tensor(loss, dtype=torch.float64), metrics=self._metrics(kind, f, r),
                           advance=advance, lr_scale=self.u.ga_lr_scale, in_loss=False)

    def eval_batch(self, micro: Micro) -> StepOutcome:
        return self.lm.eval_batch(micro)

    def state_dict(self) -> dict[str, Any]:
        return {}  # everything lives in the train source's state (``UnlearningBatches``)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
