"""Everything a run builds before its first step: process group and mesh, model, objective (which
parallelizes it), data, optimizers, schedule, loss scaler, checkpointer, metrics, and the restore.

Order matters and is kept here in one place: the start decision is taken (and logged) before
anything is built; every rank seeds identically before the model is built (same initial weights
before sharding); finetune weights go into the whole model before the objective copies it (DPO's
reference) or splits it (pipeline stages); the checkpoint is restored last, into the built parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from neoxt.config.schema import RunConfig
from neoxt.errors import ConfigError
from neoxt.train.batches import DictBatches, eod_id_for
from neoxt.train.checkpointer import (
    Checkpointer,
    Progress,
    load_target,
    load_weights,
    reconcile_schedule,
    seed_everything,
    where_to_start,
)
from neoxt.train.metrics import MetricsLogger, default_peak_tflops, wandb_settings
from neoxt.train.objectives import Objective, ObjectiveContext, build_objective, factory_for
from neoxt.train.optim import build_optimizer
from neoxt.train.precision import LossScaler
from neoxt.train.schedule import LRSchedule, build_schedule
from neoxt.train.step import StepCounters, Stepper, gradient_clipper, is_sharded


class BatchSource(Protocol):
    """What the loop needs from a data loader: an endless iterator of micro-batches plus a position.

    A micro-batch is a dict of [micro_batch, seq] tensors: ``tokens``, ``labels`` (negative = no
    target), optional ``loss_mask`` (0/1) and ``position_ids``. ``state_dict()`` taken between two
    ``next()`` calls restores, via ``load_state_dict``, the exact batch sequence that follows.
    """

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def __next__(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainData:
    train: BatchSource
    valid: BatchSource | None = None


@dataclass
class Run:
    """What ``setup`` built; the loop reads it."""

    cfg: RunConfig
    device: torch.device
    rank: int
    dp_size: int
    cp_size: int  # context parallel: each rank's batches hold 1/cp_size of every sequence
    data: TrainData
    objective: Objective
    optimizers: list[torch.optim.Optimizer]
    schedule: LRSchedule
    stepper: Stepper
    checkpointer: Checkpointer
    metrics: MetricsLogger
    progress: Progress
    counters: StepCounters
    resumed_from: Path | None


def check_config(cfg: RunConfig) -> None:
    """What must hold before anything is built (named keys, one line)."""
    if cfg.training.train_iters <= 0:
        raise ConfigError("train_iters must be set to a positive number of iterations")
    factory = factory_for(cfg)  # train_impl names a registered objective (that runs under this parallelism)
    check = getattr(factory, "check_config", None)  # the objective's own checks, before anything is built
    if check is not None:
        check(cfg)
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.optimizer.lr}")
    if cfg.training.max_consecutive_nan < 1:
        raise ConfigError(f"max_consecutive_nan must be at least 1, got {cfg.training.max_consecutive_nan}")
    from neoxt.io import check_writable

    for key, path in (("save", cfg.checkpoint.save), ("log_dir", cfg.logging.log_dir),
                      ("tensorboard_dir", cfg.logging.tensorboard_dir)):
        if path:  # writable now, not at the first checkpoint hours later
            check_writable(path, key, directory=True)
    from neoxt.distributed.context_parallel import check_context_parallel
    from neoxt.distributed.float8 import check_float8

    check_float8(cfg, default_device())  # float8_recipe: refused in one line where it cannot run
    check_context_parallel(cfg)


def resolve_vocab(cfg: RunConfig) -> RunConfig:
    """Fill ``padded_vocab_size`` from the tokenizer (rounded up, GPT-NeoX style) when unset."""
    from neoxt.tokenizer import load_tokenizer, padded_vocab_size

    if cfg.model.padded_vocab_size is not None:
        return cfg
    tok = load_tokenizer(cfg.tokenizer)
    padded = padded_vocab_size(tok.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallelism.model_parallel_size)
    return replace(cfg, model=replace(cfg.model, padded_vocab_size=padded))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def join_process_group(cfg: RunConfig, say: Callable[[str], None]) -> tuple[Any, int, int, Any]:
    """(mesh, data-parallel rank, data-parallel size, data-parallel group) after joining the process
    group with the configured ``dist_timeout_s`` (the only initialisation: see ``init_distributed``)."""
    from neoxt.distributed.mesh import build_mesh, dp_group, dp_rank_size, group_timeout_s, init_distributed

    env = init_distributed(cfg.parallelism.dist_timeout_s, cfg.parallelism.dist_startup_timeout_s)
    mesh = build_mesh(cfg.parallelism)
    timeout = group_timeout_s()
    if timeout is not None:
        say(f"process group: {env.world_size} ranks, collective timeout {timeout:g} s")
    dp_rank, dp_size = dp_rank_size(mesh)
    return mesh, dp_rank, dp_size, dp_group(mesh)


def _metrics(cfg: RunConfig, device: torch.device, rank: int, counters: StepCounters, start: int) -> MetricsLogger:
    from neoxt.model import flops_per_token

    try:
        fpt = flops_per_token(cfg.model, cfg.data.seq_length) if cfg.model.padded_vocab_size else 0.0
    except (ImportError, ValueError):
        fpt = 0.0
    run_dir = cfg.checkpoint.save or cfg.logging.log_dir
    return MetricsLogger(
        run_dir=Path(run_dir) if run_dir else None, train_iters=cfg.training.train_iters, flops_per_token=fpt,
        peak_tflops=cfg.logging.peak_theoretical_tflops or default_peak_tflops(device.type),
        log_interval=cfg.logging.log_interval, tensorboard_dir=cfg.logging.tensorboard_dir,
        wandb=wandb_settings(cfg.logging, Path(run_dir) if run_dir else None), enabled=rank == 0,
        nan_count=counters.nan_count, skipped_count=counters.skipped_count, start_iteration=start,
    )


def _load_fn(finetune_from: Path | None, cfg: RunConfig) -> Callable[[nn.Module], Any] | None:
    """What fills a module with the ``load`` weights (e.g. DPO's reference): the step ``load`` +
    ``iteration`` select, the same one the policy started from."""
    if not cfg.checkpoint.load:
        return None
    return lambda m: load_weights(finetune_from if finetune_from is not None else load_target(cfg), m)


def setup(cfg: RunConfig, config_yaml: str, data: TrainData | None, model: nn.Module | None,
          say: Callable[[str], None]) -> Run:
    """Build the run ``cfg`` describes (``data`` / ``model``: a caller's, instead of the config's)."""
    from neoxt.distributed.mesh import rank_world

    t, c = cfg.training, cfg.checkpoint
    resume_from, finetune_from = where_to_start(cfg, say)  # first, so it is the first log line
    seed_everything(t.seed)  # same seed on every rank: identical initial weights before sharding
    mesh, dp_rank, dp_size, group = join_process_group(cfg, say)
    device = default_device()
    model = model if model is not None else build_model(cfg, device)
    progress, counters = Progress(), StepCounters()
    if finetune_from is not None:  # into the whole model, before it is copied, split or sharded
        say(f"loaded weights from {load_weights(finetune_from, model)}")  # the counter stays at 0 (GPT-NeoX)

    def parallelize(module: nn.Module) -> nn.Module:
        from neoxt.distributed.parallelize import parallelize as apply

        return apply(module, cfg, mesh)

    objective = build_objective(ObjectiveContext(
        cfg=cfg, model=model, mesh=mesh, group=group, dp_size=dp_size, device=device,
        fresh_start=resume_from is None, load_weights=_load_fn(finetune_from, cfg),
        parallelize=parallelize, say=say,
    ))
    parts = objective.parts
    if group is not None and not is_sharded(parts):
        raise RuntimeError("data-parallel training needs a model parallelized with FSDP2 (neoxt.distributed.parallelize)")
    for part in parts:
        part.train()
    if data is None:  # an objective may bring its own data (REINFORCE's JSONL prompts), else the config's
        own = getattr(factory_for(cfg), "open_data", None)
        source = own(cfg, dp_rank, dp_size) if own is not None else None
        data = TrainData(source) if source is not None else open_train_data(cfg, dp_rank, dp_size)
    own_source = getattr(objective, "train_source", None)  # base.py (d): an objective that mixes in its own data
    if own_source is not None:
        data = replace(data, train=own_source(data.train))
    data, cp_size = split_sequences(data, mesh)
    optimizers = [build_optimizer(part, cfg.optimizer) for part in parts]
    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, t.train_iters)
    scaler = LossScaler.from_config(t)
    pipelined = cfg.parallelism.pipe_parallel_size > 1
    checkpointer = Checkpointer(cfg, config_yaml, parts, optimizers, scaler, data, objective, counters, progress,
                                say, pipelined)
    if resume_from is not None:
        schedule = reconcile_schedule(schedule, checkpointer.restore(resume_from), cfg, say)
    if c.no_save_optim and c.save:
        say("warning: no_save_optim is set: checkpoints hold no optimizer state, so a run resumed from "
            "them (e.g. the next job of a chain) cannot continue exactly")
    clip = gradient_clipper(parts, cfg.optimizer.gradient_clipping, mesh["pp"] if pipelined else None)
    stepper = Stepper(objective, optimizers, scaler, cfg, counters, clip)
    rank = rank_world()[0]
    return Run(cfg=cfg, device=device, rank=rank, dp_size=dp_size, cp_size=cp_size, data=data, objective=objective,
               optimizers=optimizers, schedule=schedule, stepper=stepper, checkpointer=checkpointer,
               metrics=_metrics(cfg, device, rank, counters, progress.iteration), progress=progress, counters=counters,
               resumed_from=resume_from)


def split_sequences(data: TrainData, mesh: Any) -> tuple[TrainData, int]:
    """(data whose batches are this rank's share of every sequence, cp size) under context parallelism."""
    from neoxt.distributed.context_parallel import SplitBatches, sequence_split

    split = sequence_split(mesh)
    if split is None:
        return data, 1
    valid = SplitBatches(data.valid, split) if data.valid is not None else None
    return replace(data, train=SplitBatches(data.train, split), valid=valid), split.size


def build_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    from neoxt.model import Transformer

    return Transformer(cfg.model).to(device)


def open_train_data(cfg: RunConfig, dp_rank: int = 0, dp_size: int = 1) -> TrainData:
    """Train/valid micro-batch sources for ``cfg`` from ``neoxt.data.loader`` (this rank's slice)."""
    from neoxt.data.loader import build_loader

    eod_id = eod_id_for(cfg)
    if dp_size != cfg.training.data_parallel_size:
        raise ConfigError(
            f"the config's data-parallel size {cfg.training.data_parallel_size} (from WORLD_SIZE when it was "
            f"loaded) differs from the {dp_size} data-parallel ranks running; load the config in the job"
        )
    train = build_loader(cfg, "train", dp_rank=dp_rank, eod_id=eod_id)
    if train is None:
        raise ConfigError("no training data: set data_path or train_data_paths")
    valid = build_loader(cfg, "valid", dp_rank=dp_rank, eod_id=eod_id) if cfg.training.eval_iters > 0 else None
    return TrainData(DictBatches(train), DictBatches(valid) if valid is not None else None)
