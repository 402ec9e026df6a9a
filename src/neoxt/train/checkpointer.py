"""When and what a training run saves, where it starts, and how it resumes exactly.

Where a run starts (``where_to_start``, decided once, printed as the first line of the log):

1. ``save`` already holds a checkpoint → resume from its latest *exactly* (model, optimizer, schedule,
   RNG, data position, objective state), whatever ``finetune`` / ``load`` / ``iteration`` say.
   Re-running the same command after a crash, walltime or SIGTERM continues the run; nobody edits
   the config.
2. ``finetune: true`` and ``load`` → weights only (a neoxt checkpoint or an HF model directory), fresh
   optimizer, the counter at 0 (GPT-NeoX's ``load_checkpoint``: ``iteration`` picks
   ``global_step<iteration>`` under ``load``, ``finetune`` then resets the counter).
3. ``load`` alone → resume exactly from that checkpoint (``iteration`` picks ``global_step<N>``).

A missing ``global_step<iteration>`` is an error naming it (GPT-NeoX refuses it too), never a silent
fallback to ``latest``.
4. Otherwise from scratch.

The on-disk format (DCP directory, ``meta.json``, ``latest``, atomic publish, pruning) is
``neoxt.checkpoint``'s; this module decides the state dict: ``model`` / ``optimizer`` (FQN
keyed, so they reshard), ``scheduler``, ``loss_scaler``, ``counters``, ``rng.rank<r>``, ``data``
and the objective's own ``objective`` state.
"""

from __future__ import annotations

import os
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neoxt import checkpoint as ckpt
from neoxt.config.schema import RunConfig
from neoxt.distributed.mesh import rank_world
from neoxt.errors import CheckpointError
from neoxt.train.objectives import Objective
from neoxt.train.precision import LossScaler
from neoxt.train.schedule import LRSchedule
from neoxt.train.step import StepCounters
from neoxt.train.watchdog import suspended


@dataclass
class Progress:
    """Where the run is: saved in ``meta.json``."""

    iteration: int = 0
    consumed_tokens: int = 0
    consumed_samples: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators ``state`` holds (a CPU-saved state has no "cuda" entry, and vice versa)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _saved_keys(ckpt_dir: Path) -> set[str]:
    """The flattened keys ("rng.rank0.torch", "model.embed.weight", ...) the checkpoint's DCP metadata
    lists. Every rank reads the same file, so decisions taken from it agree across ranks without a
    collective (a rank-dependent failure inside the collective ``dcp.load`` would hang or abort all)."""
    return set(ckpt.read_dcp_metadata(ckpt_dir))


def rng_source(keys: set[str], rank: int, world: int) -> tuple[int | None, list[int]]:
    """(saved rank whose RNG state this rank restores, or None when none is saved; the ranks of this run
    that have no RNG state of their own in the checkpoint).

    A checkpoint written by fewer ranks lacks ``rng.rank<r>`` for the new ranks; they continue from
    rank 0's state, which is what a fresh run has on every rank (the same seed everywhere).
    """
    saved = sorted({int(k.split(".")[1][4:]) for k in keys
                    if k.startswith("rng.rank") and k.split(".")[1][4:].isdigit()})
    if not saved:
        return None, list(range(world))
    missing = [r for r in range(world) if r not in saved]
    return (rank if rank in saved else saved[0]), missing


def _state_options(flat: bool):
    """Pipeline stages each have an optimizer; flattened (FQN-keyed) optimizer state lets their dicts
    merge into one (a nested dict's ``param_groups`` list would collide). Unpipelined runs keep the
    nested layout their checkpoints have always had."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flat)


def flat_optimizer_state(keys: set[str]) -> bool:
    """Whether a checkpoint's optimizer state is flattened (``optimizer.param_groups.<name>.lr``, from a
    pipelined run) rather than nested (``optimizer.param_groups.0.lr``)."""
    prefix = "optimizer.param_groups."
    return any(k.startswith(prefix) and not k[len(prefix):].split(".", 1)[0].isdigit() for k in keys)


def _part_states(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None, flat: bool,
                 skip_unstepped: bool) -> list[tuple[dict, dict | None]]:
    """(model, optimizer) FQN-keyed state dicts per part (one model, or a rank's pipeline stages)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    options = _state_options(flat)
    out: list[tuple[dict, dict | None]] = []
    for i, part in enumerate(parts):
        opt = optimizers[i] if optimizers is not None else None
        if opt is None or (skip_unstepped and not opt.state):  # a never-stepped optimizer has no state
            out.append((get_model_state_dict(part, options=options), None))
        else:
            out.append(get_state_dict(part, opt, options=options))
    return out


def _merged(per_part: list[tuple[dict, dict | None]]) -> tuple[dict, dict | None]:
    msd = {k: v for m, _ in per_part for k, v in m.items()}
    osd = {k: v for _, o in per_part if o is not None for k, v in o.items()}
    return msd, (osd or None)


_SCHED_TEMPLATE = {"start_lr": 0.0, "warmup_iter": 0.0, "num_iters": 0, "decay_style": "", "end_iter": 0, "min_lr": 0.0}


# Model fields a resumed run may change: initialisation only matters at the start, dropout is not in the
# weights, and a shape change in max_position_embeddings / vocabulary padding fails on the tensors anyway.
_RESUME_MAY_CHANGE = frozenset({"init_method", "output_layer_init_method", "init_method_std", "attention_dropout",
                                "hidden_dropout", "make_vocab_size_divisible_by", "max_position_embeddings"})


def check_same_architecture(ckpt_dir: Path, cfg: RunConfig) -> None:
    """Refuse an exact resume into a different architecture (another norm, activation, rotary setting…),
    which would load matching shapes and silently train a different function, naming the first field."""
    import dataclasses

    from neoxt.checkpoint.loading import read_checkpoint_config
    from neoxt.errors import ConfigError

    try:
        if not ckpt.read_config_text(ckpt_dir).strip():
            return  # saved without a config (a caller that passed none): the tensors decide
        saved = read_checkpoint_config(ckpt_dir).model
    except ConfigError:
        return
    for field in dataclasses.fields(saved):
        old, new = getattr(saved, field.name), getattr(cfg.model, field.name)
        if field.name not in _RESUME_MAY_CHANGE and old != new and not (old is None or new is None):
            raise CheckpointError(
                f"{ckpt_dir / ckpt.CONFIG_FILE}: model field '{field.name}' is {old!r} in the checkpoint but {new!r} "
                "in the config; resuming needs the same architecture (use a new save dir with finetune: true + load "
                "to start a different model from these weights)")


def save_iterations(cfg: RunConfig) -> tuple[set[int], int | None]:
    """(explicit save iterations, linear factor or None)."""
    c = cfg.checkpoint
    explicit = set(int(i) for i in c.extra_save_iters)
    factor = c.checkpoint_factor
    if factor and c.checkpoint_scale == "log":
        it = float(factor)
        n = 1
        while it <= cfg.training.train_iters and factor > 1:
            explicit.add(int(it))
            n += 1
            it = float(factor) ** n
        return explicit, None
    return explicit, (int(factor) if factor else None)


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly (see the module docstring)."""

    def __init__(self, cfg: RunConfig, config_yaml: str, parts: list[nn.Module],
                 optimizers: list[torch.optim.Optimizer], scaler: LossScaler, data: Any, objective: Objective,
                 counters: StepCounters, progress: Progress, say: Callable[[str], None], pipelined: bool = False):
        self.cfg, self.config_yaml, self.parts, self.optimizers = cfg, config_yaml, parts, optimizers
        self.scaler, self.data, self.objective, self.counters, self.progress = scaler, data, objective, counters, progress
        self.say, self.pipelined = say, pipelined
        self.save_iters, self.save_factor = save_iterations(cfg)
        self.last: Path | None = None
        self.last_finite: Path | None = None  # the last one saved right after a finite step
        self._finite = True  # the save being written followed a finite step
        self.blocked_s: list[float] = []  # how long each save held the training loop
        self.writer = None
        self._started = 0.0
        if cfg.checkpoint.save and cfg.checkpoint.async_save:
            from neoxt.checkpoint.async_save import AsyncCheckpointWriter

            self.writer = AsyncCheckpointWriter()

    def should_save(self, iteration: int) -> bool:
        """An explicit/log-scale save iteration, a ``checkpoint_factor`` multiple, ``exit_interval`` or the end."""
        t = self.cfg.training
        return (iteration in self.save_iters or bool(self.save_factor and iteration % self.save_factor == 0)
                or bool(t.exit_interval and iteration % t.exit_interval == 0) or iteration == t.train_iters)

    def _state(self, schedule_sd: dict[str, Any], data_state: dict[str, Any] | None) -> dict[str, Any]:
        c = self.cfg.checkpoint
        msd, osd = _merged(_part_states(self.parts, None if c.no_save_optim else self.optimizers,
                                        self.pipelined, skip_unstepped=True))
        state: dict[str, Any] = {"model": msd}
        if osd is not None:
            state["optimizer"] = osd
        state["scheduler"] = schedule_sd
        state["loss_scaler"] = self.scaler.state_dict()
        state["counters"] = self.counters.state_dict()
        if not c.no_save_rng:
            state["rng"] = {f"rank{rank_world()[0]}": _rng_state()}
        state["data"] = {"train": data_state if data_state is not None else self.data.train.state_dict()}
        if self.data.valid is not None:
            state["data"]["valid"] = self.data.valid.state_dict()
        extra = self.objective.state_dict()
        if extra:
            state["objective"] = extra
        return state

    def save(self, schedule: LRSchedule, data_state: dict[str, Any] | None = None, wait: bool = False) -> Path | None:
        """Write ``global_step<iteration>`` (``data_state``: the data position to record instead of the
        current one, e.g. the start of a step that is being undone), then prune to keep-last-N.

        With ``async_save`` the write continues in the background after this returns (``wait``: not
        this time); ``finish`` waits for it. Either way ``latest`` moves only once it is complete.
        A save may take longer than any step: the step watchdog does not time it."""
        if not self.cfg.checkpoint.save:
            return None
        with suspended("checkpoint save"):
            return self._save(schedule, data_state, wait)

    def _save(self, schedule: LRSchedule, data_state: dict[str, Any] | None, wait: bool) -> Path | None:
        c = self.cfg.checkpoint
        t0 = time.perf_counter()
        p = self.progress
        if self.writer is not None:
            self.finish()  # one save in flight: the previous one is published (and pruned) first
        state = self._state(schedule.state_dict(p.iteration), data_state)
        meta = {"consumed_tokens": p.consumed_tokens, "consumed_samples": p.consumed_samples,
                "nan_count": self.counters.nan_count}
        self._finite = self.counters.consecutive_nan == 0
        if self.writer is None:
            path = ckpt.save_checkpoint(Path(c.save), p.iteration, state, self.config_yaml, meta)
            self.blocked_s.append(time.perf_counter() - t0)
            self._published(path, t0)
            return path
        ticket = self.writer.save(Path(c.save), p.iteration, state, self.config_yaml, meta)
        self.blocked_s.append(time.perf_counter() - t0)
        self._started = t0
        self.say(f"saving checkpoint {ticket.path} in the background (training blocked "
                 f"{self.blocked_s[-1]:.2f} s)")
        self.last = ticket.path
        if wait:
            self.finish()
        return ticket.path

    def finish(self) -> None:
        """Wait for a background save still being written (the end of a run, SIGTERM, an error)."""
        if self.writer is not None:
            with suspended("checkpoint save"):
                path = self.writer.wait()
            if path is not None:
                self._published(path, self._started)

    def close(self) -> None:
        """End of the run: wait for the in-flight save, then free the staging buffers."""
        self.finish()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _published(self, path: Path, t0: float) -> None:
        c = self.cfg.checkpoint
        self.say(f"saved checkpoint {path} ({time.perf_counter() - t0:.2f} s)")
        if self._finite:
            self.last_finite = path
        removed = ckpt.prune_checkpoints(c.save, c.keep_last_n_checkpoints) if rank_world()[0] == 0 else []
        for old in removed:
            self.say(f"removed old checkpoint {old}")
        self.last = path

    def keep_last_finite(self) -> Path | None:
        """On giving up after a NaN streak: point ``latest`` back at the last checkpoint saved after a
        finite step (later ones were saved mid-streak), so a rerun starts there. Returns it."""
        self.finish()  # a background save of a mid-streak step must not move `latest` after this
        keep = self.last_finite
        if keep is None:
            return self.last
        if self.last != keep and rank_world()[0] == 0 and keep.is_dir():
            ckpt.point_latest(keep)
        return keep

    def _optimizer_layout(self, ckpt_dir: Path, saved_keys: set[str]) -> tuple[bool, bool]:
        """(load optimizer state?, is it flattened?). The layout is the saving run's: a pipelined run's
        (flattened) loads into one process too; a nested one cannot be split between pipeline stages."""
        with_optim = "optimizer" in saved_keys and not self.cfg.checkpoint.no_load_optim
        if not with_optim:
            if "optimizer" not in saved_keys and not self.cfg.checkpoint.no_load_optim:
                warnings.warn(f"{ckpt_dir}: holds no optimizer state (saved with no_save_optim or before the first "
                              "step); the optimizer starts fresh, so this resume is not exact", stacklevel=3)
            return False, self.pipelined
        flat = flat_optimizer_state(_saved_keys(ckpt_dir))
        if self.pipelined and not flat:
            raise CheckpointError(
                f"{ckpt_dir}: its optimizer state was saved without pipeline parallelism and cannot be split "
                "between pipeline stages; set no_load_optim: true to continue from its weights with a fresh optimizer"
            )
        return True, flat

    def _rng_key(self, ckpt_dir: Path, saved_keys: set[str]) -> tuple[str | None, dict[str, Any]]:
        """Which saved RNG state this rank restores and its template; decided from the metadata,
        identically on every rank, before the collective load."""
        if "rng" not in saved_keys or self.cfg.checkpoint.no_load_rng:
            return None, {}
        keys = _saved_keys(ckpt_dir)
        rank, world = rank_world()
        source, missing = rng_source(keys, rank, world)
        if source is None:
            self.say(f"note: {ckpt_dir} holds no RNG state; continuing with the seeded RNG")
            return None, {}
        key = f"rank{source}"
        if missing:
            self.say(f"note: {ckpt_dir} holds no RNG state for rank(s) {missing} (saved with fewer ranks); "
                     f"they continue from rank {source}'s")
        return key, {k: v for k, v in _rng_state().items() if f"rng.{key}.{k}" in keys}

    def _template(self, saved_keys: set[str], per_part: list[tuple[dict, dict | None]]) -> dict[str, Any]:
        """What to load: DCP fills the keys the template names, so each entry has the saved dict's keys."""
        msd, osd = _merged(per_part)
        template: dict[str, Any] = {"model": msd}
        if osd is not None:
            template["optimizer"] = osd
        for key, value in (("scheduler", dict(_SCHED_TEMPLATE)), ("loss_scaler", self.scaler.state_dict()),
                           ("counters", self.counters.state_dict()), ("objective", self.objective.state_dict())):
            if key in saved_keys:
                template[key] = value
        if "data" in saved_keys:
            template["data"] = {"train": self.data.train.state_dict()}
            if self.data.valid is not None:
                template["data"]["valid"] = self.data.valid.state_dict()
        return template

    def restore(self, ckpt_dir: Path) -> dict[str, Any] | None:
        """Restore everything ``ckpt_dir`` holds (exact resume); returns the saved schedule state."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        meta = ckpt.read_meta(ckpt_dir)
        check_same_architecture(ckpt_dir, self.cfg)
        saved_keys = set(meta.get("state_keys", ()))
        with_optim, flat = self._optimizer_layout(ckpt_dir, saved_keys)
        per_part = _part_states(self.parts, self.optimizers if with_optim else None, flat, skip_unstepped=False)
        template = self._template(saved_keys, per_part)
        rng_key, rng_template = self._rng_key(ckpt_dir, saved_keys)
        if rng_key is not None:
            template["rng"] = {rng_key: rng_template}
        ckpt.load_state(ckpt_dir, template)
        options = _state_options(flat)
        for part, opt, (m, o) in zip(self.parts, self.optimizers, per_part, strict=True):
            part_msd = {k: template["model"][k] for k in m}
            if o is not None:
                part_osd = {k: template["optimizer"][k] for k in o}
                set_state_dict(part, opt, model_state_dict=part_msd, optim_state_dict=part_osd, options=options)
            else:
                set_model_state_dict(part, part_msd, options=options)
        self._apply(template, meta)
        if rng_key is not None:
            _set_rng_state(template["rng"][rng_key])
        return template.get("scheduler")

    def _apply(self, template: dict[str, Any], meta: dict[str, Any]) -> None:
        if "loss_scaler" in template:
            self.scaler.load_state_dict(template["loss_scaler"])
        if "data" in template:
            self.data.train.load_state_dict(template["data"]["train"])
            if self.data.valid is not None and "valid" in template["data"]:
                self.data.valid.load_state_dict(template["data"]["valid"])
        if "objective" in template:
            self.objective.load_state_dict(template["objective"])
        self.progress.iteration = int(meta["iteration"])
        self.progress.consumed_tokens = int(meta.get("consumed_tokens", 0))
        self.progress.consumed_samples = int(meta.get("consumed_samples", 0))
        counters = template.get("counters", {"nan_count": meta.get("nan_count", 0)})
        self.counters.load_state_dict(counters)


def reconcile_schedule(schedule: LRSchedule, saved: dict[str, Any] | None, cfg: RunConfig,
                       say: Callable[[str], None]) -> LRSchedule:
    """The schedule to continue with after a resume (GPT-NeoX's two switches).

    ``use_checkpoint_lr_scheduler``: the checkpoint's values win. Otherwise the config's win (upstream
    asserts they are equal unless ``override_lr_scheduler``); a difference is reported, not fatal, so
    a user can change e.g. ``train_iters`` of a chained run on purpose.
    """
    if not saved:
        return schedule
    from_ckpt = LRSchedule(lr=float(saved["start_lr"]), decay_style=str(saved["decay_style"]),
                           decay_iters=int(saved["end_iter"]), warmup_iters=float(saved["warmup_iter"]),
                           min_lr=float(saved["min_lr"]))
    if cfg.schedule.use_checkpoint_lr_scheduler:
        return from_ckpt
    if from_ckpt != schedule and not cfg.schedule.override_lr_scheduler:
        say(f"note: the config's learning-rate schedule {schedule} differs from the checkpoint's {from_ckpt}; "
            "using the config's (set use_checkpoint_lr_scheduler: true to keep the checkpoint's)")
    return schedule


def load_weights(path: str | os.PathLike, model: nn.Module) -> Path:
    """Weights only, from a neoxt checkpoint/run directory or an HF model directory (finetune)."""
    p = Path(path)
    if (p / "config.json").is_file() and not ckpt.is_checkpoint_dir(p) and not (p / ckpt.LATEST_FILE).exists():
        import neoxt

        src_sd = neoxt.load_model(p, device="cpu").state_dict()
        own = model.state_dict()
        if _fresh_value_head(model, src_sd.get("lm_head.weight")):
            own.pop("lm_head.weight")
        for name, tensor in own.items():
            if name not in src_sd:
                raise CheckpointError(f"{p}: converted model has no tensor '{name}'")
            if tuple(src_sd[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{p}: tensor '{name}' has shape {tuple(src_sd[name].shape)}, the configured model "
                    f"expects {tuple(tensor.shape)}"
                )
        model.load_state_dict({k: src_sd[k] for k in own}, strict="lm_head.weight" in own)
        return p
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from neoxt.checkpoint.loading import saved_model_tensors

    target = ckpt.resolve_checkpoint(p)
    msd = get_model_state_dict(model)
    saved = saved_model_tensors(target).get("lm_head.weight")
    fresh = _fresh_value_head(model, torch.empty(saved[0], device="meta") if saved else None)
    if fresh:
        msd.pop("lm_head.weight")
    ckpt.load_state(target, {"model": msd})
    set_model_state_dict(model, msd, options=StateDictOptions(strict=not fresh))
    return target


_STEP_NAME = re.compile(r"^global_step\d+$")


def load_target(cfg: RunConfig) -> Path:
    """The checkpoint (or HF model directory) ``load`` + ``iteration`` name, checked to exist.

    As GPT-NeoX: ``iteration`` selects ``global_step<iteration>`` under ``load``; without it, ``load``'s
    ``latest``. A named step that is missing fails naming the directory and the steps that exist.
    """
    c = cfg.checkpoint
    base = Path(str(c.load))
    _refuse_deepspeed_dir(base if c.iteration is None else base / ckpt.step_dir_name(c.iteration))
    if c.iteration is None:
        if (base / "config.json").is_file() and not ckpt.is_checkpoint_dir(base) and not (base / ckpt.LATEST_FILE).exists():
            return base  # an HF model directory (weights only)
        return ckpt.resolve_checkpoint(base)
    if ckpt.is_checkpoint_dir(base) and _STEP_NAME.match(base.name):
        base = base.parent  # load: names a global_step<N> directory itself
    target = base / ckpt.step_dir_name(c.iteration)
    if not ckpt.is_checkpoint_dir(target):
        have = [p.name for p in ckpt.list_checkpoints(base)]
        raise CheckpointError(
            f"load: {target}: no such checkpoint (iteration {c.iteration}; "
            + (f"{base} holds {', '.join(have)})" if have else f"{base} holds no global_step<N> checkpoint)")
        )
    return target


def _refuse_deepspeed_dir(path: Path) -> None:
    """A GPT-NeoX/DeepSpeed checkpoint reached here was not imported (``neoxt train`` imports it on the
    fly before training; a direct ``train()`` call does not): say what to do instead of "no checkpoint"."""
    step = path
    if (path / ckpt.LATEST_FILE).is_file() and not ckpt.is_checkpoint_dir(path):
        step = path / (path / ckpt.LATEST_FILE).read_text(encoding="utf-8").strip()
    try:
        names = os.listdir(step)
    except OSError:
        return
    if not ckpt.is_checkpoint_dir(step) and any(n.endswith("model_states.pt") for n in names):
        raise CheckpointError(
            f"load: {step} is a GPT-NeoX/DeepSpeed checkpoint, not a neoxt one: train with `neoxt train` (it imports "
            f"it on the fly) or convert it first with `neoxt convert neox-to-neoxt --input-dir {step}`"
        )


def _fresh_value_head(model: nn.Module, source_head: torch.Tensor | None) -> bool:
    """True when ``model`` is a reward model starting from a language model (a vocabulary head or
    a tied one): every weight but the new value head is loaded, the head keeps its initialisation."""
    cfg = getattr(model, "cfg", None)
    return bool(cfg is not None and cfg.value_head and (source_head is None or source_head.shape[0] != 1))


def where_to_start(cfg: RunConfig, say: Callable[[str], None]) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume exactly, or None; weights to finetune from, or None), announced in one line.

    The order is the module docstring's: a checkpoint in ``save`` wins over everything, so rerunning
    an unchanged command continues the run; then ``finetune`` + ``load``; then ``load``; else scratch.
    """
    c = cfg.checkpoint
    latest = ckpt.latest_checkpoint(c.save) if c.save else None
    if latest is not None:
        say(f"resuming from {latest} (iteration {ckpt.read_meta(latest)['iteration']}): "
            f"'{c.save}' already holds a checkpoint; finetune/load/iteration are ignored")
        return latest, None
    if c.load and c.finetune:
        target = load_target(cfg)
        say(f"finetuning from weights in {target} (fresh optimizer, iteration counter at 0)")
        return None, target
    if c.load and c.save and Path(c.load).absolute() == Path(c.save).absolute():
        # GPT-NeoX's resume idiom (load = save): nothing saved there yet means a first run.
        say(f"starting from scratch (seed {cfg.training.seed}); '{c.save}' holds no checkpoint yet")
        return None, None
    if c.load:
        target = load_target(cfg)
        if not ckpt.is_checkpoint_dir(target):
            raise CheckpointError(f"load: {target}: not a complete neoxt checkpoint (an HF model directory "
                                  "loads with finetune: true)")
        say(f"resuming from {target} (load: {c.load})")
        return target, None
    say(f"starting from scratch (seed {cfg.training.seed})" + (f"; checkpoints go to {c.save}" if c.save else ""))
    return None, None
