"""The training loop: micro-batches, gradient accumulation, precision, NaN policy, checkpoints.

One step = ``gradient_accumulation_steps`` micro-batches. Their unmasked tokens are counted first
and each micro-batch's summed loss is divided by that global count, so the gradient is the gradient
of the mean over every counted token of the global batch, whatever the accumulation split; a
micro-batch with no counted token adds exactly zero.

Parallelism comes from ``neoxt.distributed``: every model goes through ``parallelize`` (FSDP2 reduces
the data-parallel gradients; the loop only sums token counts and loss shares), or, with
``pipe_parallel_size > 1``, through ``build_pipeline``, whose schedule runs the micro-batches of a
step and whose stages (named as in the whole model) each get an optimizer and go into checkpoints.

Where a run starts (decided once, printed as the first line of the log):

1. ``save`` already holds a checkpoint → resume from its latest *exactly* (model, optimizer, schedule,
   RNG, data position), whatever ``finetune`` / ``load`` / ``iteration`` say. Re-running the same
   command after a crash, walltime or SIGTERM continues the run; nobody edits the config.
2. ``finetune: true`` and ``load`` → weights only (a neoxt checkpoint or an HF model directory), fresh
   optimizer, iteration ``iteration`` (default 0).
3. ``load`` alone → resume exactly from that checkpoint (``iteration`` picks ``global_step<N>``).
4. Otherwise from scratch.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from neoxt.config.schema import RunConfig
from neoxt.errors import CheckpointError, ConfigError, NeoxtError
from neoxt.train import checkpoint as ckpt
from neoxt.train.losses import lm_loss_sum, token_mask
from neoxt.train.metrics import MetricsLogger, StepStats, default_peak_tflops, wandb_settings
from neoxt.train.optim import build_optimizer, set_lr
from neoxt.train.precision import LossScaler, autocast
from neoxt.train.schedule import LRSchedule, build_schedule
from neoxt.train.signals import SignalFlag


class TrainingStopped(NeoxtError):
    """Training stopped on purpose with an error status (on_nan: stop); the last good state is saved."""


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
class TrainResult:
    iteration: int
    status: str  # "finished" | "signal" | "exit_interval" | "stopped"
    start_iteration: int
    losses: list[float] = field(default_factory=list)  # per step, in order (NaN for skipped steps)
    last_checkpoint: Path | None = None
    nan_count: int = 0
    resumed_from: Path | None = None


@dataclass
class _State:
    iteration: int = 0
    consumed_tokens: int = 0
    consumed_samples: int = 0
    nan_count: int = 0
    skipped_count: int = 0


# --------------------------------------------------------------------------------------------------
# Setup helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
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
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return set(FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata)
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise CheckpointError(f"{ckpt_dir}: cannot read the checkpoint's DCP metadata: {err}") from err


def _rng_source(keys: set[str], rank: int, world: int) -> tuple[int | None, list[int]]:
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


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum over the data-parallel process group; ``None`` (one data-parallel rank) is a no-op.

    Never the world group by default: tensor-parallel ranks of one data-parallel rank see the same
    batch and must not be counted twice.
    """
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


def _is_sharded(model: nn.Module) -> bool:
    """FSDP2/TP-parallelised models (DTensor parameters) reduce their own gradients."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def resolve_vocab(cfg: RunConfig) -> RunConfig:
    """Fill ``padded_vocab_size`` from the tokenizer (rounded up, GPT-NeoX style) when unset."""
    from dataclasses import replace

    from neoxt.tokenizer import load_tokenizer, padded_vocab_size

    if cfg.model.padded_vocab_size is not None:
        return cfg
    tok = load_tokenizer(cfg.tokenizer)
    padded = padded_vocab_size(
        tok.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallelism.model_parallel_size
    )
    return replace(cfg, model=replace(cfg.model, padded_vocab_size=padded))


def build_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    from neoxt.model import Transformer

    return Transformer(cfg.model).to(device)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Checkpoint state


def _state_options(pipelined: bool):
    """Pipeline stages each have an optimizer; flattened (FQN-keyed) optimizer state lets their dicts
    merge into one (a nested dict's ``param_groups`` list would collide). Unpipelined runs keep the
    nested layout their checkpoints have always had."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=pipelined)


def _flat_optimizer_state(keys: set[str]) -> bool:
    """Whether a checkpoint's optimizer state is flattened (``optimizer.param_groups.<name>.lr``, from a
    pipelined run) rather than nested (``optimizer.param_groups.0.lr``)."""
    prefix = "optimizer.param_groups."
    return any(k.startswith(prefix) and not k[len(prefix):].split(".", 1)[0].isdigit() for k in keys)


def _model_optim_state(
    parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None, pipelined: bool = False
) -> tuple[dict, dict | None]:
    """FQN-keyed state dicts (DCP-friendly, reshardable) of the model parts this rank holds (one, or
    its pipeline stages, whose names are the full model's). A never-stepped optimizer has no state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    options = _state_options(pipelined)
    msd: dict[str, Any] = {}
    osd: dict[str, Any] = {}
    for i, part in enumerate(parts):
        opt = optimizers[i] if optimizers is not None else None
        if opt is None or not opt.state:
            msd.update(get_model_state_dict(part, options=options))
            continue
        m, o = get_state_dict(part, opt, options=options)
        msd.update(m)
        osd.update(o)
    return msd, (osd or None)


def _checkpoint_state(
    parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    st: _State,
    schedule_sd: dict[str, Any],
    scaler: LossScaler,
    data: TrainData,
    data_state: dict[str, Any] | None,
    cfg: RunConfig,
    pipelined: bool = False,
) -> dict[str, Any]:
    msd, osd = _model_optim_state(parts, None if cfg.checkpoint.no_save_optim else optimizers, pipelined)
    rank, _ = _rank_world()
    state: dict[str, Any] = {"model": msd}
    if osd is not None:
        state["optimizer"] = osd
    state["scheduler"] = schedule_sd
    state["loss_scaler"] = scaler.state_dict()
    state["counters"] = {"nan_count": st.nan_count, "skipped_count": st.skipped_count}
    if not cfg.checkpoint.no_save_rng:
        state["rng"] = {f"rank{rank}": _rng_state()}
    data_sd = {"train": data_state if data_state is not None else data.train.state_dict()}
    if data.valid is not None:
        data_sd["valid"] = data.valid.state_dict()
    state["data"] = data_sd
    return state


def _save(
    run_dir: Path, st: _State, state: dict[str, Any], config_yaml: str, log: Callable[[str], None]
) -> Path:
    t0 = time.time()
    meta = {
        "consumed_tokens": st.consumed_tokens,
        "consumed_samples": st.consumed_samples,
        "nan_count": st.nan_count,
    }
    path = ckpt.save_checkpoint(run_dir, st.iteration, state, config_yaml, meta)
    log(f"saved checkpoint {path} ({time.time() - t0:.2f} s)")
    return path


def _load_full(
    ckpt_dir: Path,
    parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    scaler: LossScaler,
    data: TrainData,
    cfg: RunConfig,
    st: _State,
    say: Callable[[str], None] = lambda msg: None,
    pipelined: bool = False,
) -> dict[str, Any] | None:
    """Restore everything a checkpoint holds (exact resume); returns the saved schedule state."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    meta = ckpt.read_meta(ckpt_dir)
    saved_keys = set(meta.get("state_keys", ()))
    with_optim = "optimizer" in saved_keys and not cfg.checkpoint.no_load_optim
    flat = pipelined
    if with_optim:
        # The optimizer state's layout is the saving run's: a pipelined run's (flattened) loads into
        # one process too; a nested one cannot be split between pipeline stages.
        flat = _flat_optimizer_state(_saved_keys(ckpt_dir))
        if pipelined and not flat:
            raise CheckpointError(
                f"{ckpt_dir}: its optimizer state was saved without pipeline parallelism and cannot be split "
                "between pipeline stages; set no_load_optim: true to continue from its weights with a fresh optimizer"
            )
    options = _state_options(flat)
    # One template per part (a pipeline rank's stages), merged for the single collective load.
    per_part: list[tuple[dict, dict | None]] = []
    for part, opt in zip(parts, optimizers, strict=True):
        if with_optim:
            per_part.append(get_state_dict(part, opt, options=options))
        else:
            per_part.append((get_model_state_dict(part, options=options), None))
    rank, world = _rank_world()
    template: dict[str, Any] = {"model": {k: v for m, _ in per_part for k, v in m.items()}}
    if with_optim:
        template["optimizer"] = {k: v for _, o in per_part for k, v in o.items()}
    # DCP fills the keys the template names, so each template has the saved dict's keys.
    sched_template = {"start_lr": 0.0, "warmup_iter": 0.0, "num_iters": 0, "decay_style": "", "end_iter": 0, "min_lr": 0.0}
    counters_template = {"nan_count": 0, "skipped_count": 0}
    for key, value in (("scheduler", sched_template), ("loss_scaler", scaler.state_dict()), ("counters", counters_template)):
        if key in saved_keys:
            template[key] = value
    if "data" in saved_keys:
        template["data"] = {"train": data.train.state_dict()}
        if data.valid is not None:
            template["data"]["valid"] = data.valid.state_dict()
    rng_key = None
    if "rng" in saved_keys and not cfg.checkpoint.no_load_rng:
        # Decided from the metadata, identically on every rank, before the collective load.
        keys = _saved_keys(ckpt_dir)
        source, missing = _rng_source(keys, rank, world)
        if source is not None:
            rng_key = f"rank{source}"
            template["rng"] = {rng_key: {k: v for k, v in _rng_state().items() if f"rng.{rng_key}.{k}" in keys}}
            if missing:
                say(f"note: {ckpt_dir} holds no RNG state for rank(s) {missing} (saved with fewer ranks); "
                    f"they continue from rank {source}'s")
        else:
            say(f"note: {ckpt_dir} holds no RNG state; continuing with the seeded RNG")
    ckpt.load_state(ckpt_dir, template)
    for part, opt, (m, o) in zip(parts, optimizers, per_part, strict=True):
        part_msd = {k: template["model"][k] for k in m}
        if o is not None:
            part_osd = {k: template["optimizer"][k] for k in o}
            set_state_dict(part, opt, model_state_dict=part_msd, optim_state_dict=part_osd, options=options)
        else:
            set_model_state_dict(part, part_msd, options=options)
    if not with_optim:
        if "optimizer" in saved_keys or cfg.checkpoint.no_load_optim:
            pass
        else:
            warnings.warn(
                f"{ckpt_dir}: holds no optimizer state (saved with no_save_optim or before the first step); "
                "the optimizer starts fresh, so this resume is not exact",
                stacklevel=2,
            )
    if "loss_scaler" in template:
        scaler.load_state_dict(template["loss_scaler"])
    if "data" in template:
        data.train.load_state_dict(template["data"]["train"])
        if data.valid is not None and "valid" in template["data"]:
            data.valid.load_state_dict(template["data"]["valid"])
    counters = template.get("counters", {})
    st.iteration = int(meta["iteration"])
    st.consumed_tokens = int(meta.get("consumed_tokens", 0))
    st.consumed_samples = int(meta.get("consumed_samples", 0))
    st.nan_count = int(counters.get("nan_count", meta.get("nan_count", 0)))
    st.skipped_count = int(counters.get("skipped_count", 0))
    if rng_key is not None:
        _set_rng_state(template["rng"][rng_key])
    return template.get("scheduler")


def _reconcile_schedule(schedule: LRSchedule, saved: dict[str, Any] | None, cfg: RunConfig, say) -> LRSchedule:
    """The schedule to continue with after a resume (GPT-NeoX's two switches).

    ``use_checkpoint_lr_scheduler``: the checkpoint's values win. Otherwise the config's win (upstream
    asserts they are equal unless ``override_lr_scheduler``); a difference is reported, not fatal, so
    a user can change e.g. ``train_iters`` of a chained run on purpose.
    """
    if not saved:
        return schedule
    from_ckpt = LRSchedule(
        lr=float(saved["start_lr"]),
        decay_style=str(saved["decay_style"]),
        decay_iters=int(saved["end_iter"]),
        warmup_iters=float(saved["warmup_iter"]),
        min_lr=float(saved["min_lr"]),
    )
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

        source = neoxt.load_model(p, device="cpu")
        src_sd = source.state_dict()
        own = model.state_dict()
        for name, tensor in own.items():
            if name not in src_sd:
                raise CheckpointError(f"{p}: converted model has no tensor '{name}'")
            if tuple(src_sd[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{p}: tensor '{name}' has shape {tuple(src_sd[name].shape)}, the configured model "
                    f"expects {tuple(tensor.shape)}"
                )
        model.load_state_dict({k: src_sd[k] for k in own}, strict=True)
        return p
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    target = ckpt.resolve_checkpoint(p)
    msd = get_model_state_dict(model)
    ckpt.load_state(target, {"model": msd})
    set_model_state_dict(model, msd)
    return target


def _save_iterations(cfg: RunConfig) -> tuple[set[int], int | None]:
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


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank: every rank must take the same branch before a
    collective checkpoint save (torchrun forwards a signal to each rank at a slightly different time)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------------------------------
# The loop


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], precision: str, device_type: str, z_loss: float):
    with autocast(precision, device_type):
        logits = model(batch["tokens"], positions=batch.get("position_ids"), attn_mask=batch.get("attention_mask"))
    return lm_loss_sum(logits, batch["labels"], batch.get("loss_mask"), z_loss)


def _eval_tasks(model: nn.Module, cfg: RunConfig, iteration: int, rank: int) -> dict[str, float]:
    """GPT-NeoX's ``eval_tasks`` during training: lm-eval through the same adapter as ``neoxt eval``.

    Every rank runs it (a sharded model's forwards are collective); rank 0 writes lm-eval's JSON
    into the run directory."""
    from neoxt.evaluate.harness import eval_during_training
    from neoxt.tokenizer import load_tokenizer

    out_dir = cfg.checkpoint.save or cfg.logging.log_dir
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            return eval_during_training(model, load_tokenizer(cfg.tokenizer), cfg, iteration,
                                        out_dir if rank == 0 else None)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: BatchSource,
    iters: int,
    cfg: RunConfig,
    device: torch.device,
    objective: Callable[..., torch.Tensor] | None = None,
    group: Any = None,
) -> tuple[float, int]:
    """Mean loss over the counted tokens of ``iters`` global validation batches (or the mean
    post-training objective over those batches), and the number of counted tokens."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    acc = cfg.training.gradient_accumulation_steps
    try:
        for _ in range(iters):
            micro = [_move(next(source), device) for _ in range(acc)]
            for batch in micro:
                count += token_mask(batch["labels"], batch.get("loss_mask")).sum().double()
            if objective is not None:
                total += objective(micro, backward=False) / max(iters, 1)
                continue
            for batch in micro:
                s, _ = _forward_loss(model, batch, cfg.training.precision, device.type, 0.0)
                total += s.double()
    finally:
        model.train(was_training)
    if objective is not None:  # already a global mean per batch
        _all_reduce_sum(count, group)
        return total.item(), int(count.item())
    _all_reduce_sum(total, group)
    _all_reduce_sum(count, group)
    return (total / count.clamp(min=1)).item(), int(count.item())


def accumulate_gradients(
    model: nn.Module,
    micro: list[dict[str, torch.Tensor]],
    precision: str = "fp32",
    loss_scale: float = 1.0,
    z_loss: float = 0.0,
    group: Any = None,
    aux: dict[str, float] | None = None,
) -> torch.Tensor:
    """Backward over one global batch; returns the loss (mean over every counted token, float64).

    MoE models: each micro-batch's weighted auxiliary loss (``model.aux_loss()``) joins the backward
    divided by micro-batches x data-parallel ranks (a mean over them, as the LM loss); the returned
    loss stays the LM loss and ``aux`` (when given) receives this rank's unweighted aux losses.

    Gradients left in ``.grad`` are those of that mean, unscaled. With a data-parallel ``group`` the
    model must be parallelized (``neoxt.distributed.parallelize``): FSDP2 sums the ranks' gradients,
    each rank's loss being divided by the global token count; only the loss and counts are reduced here.
    The counted tokens of all micro-batches (and ranks) are known before the first backward, so
    each micro-batch's *sum* is divided by the global count: accumulation does not change the
    result, and a micro-batch with no counted token contributes zero loss and zero gradient.
    """
    device = micro[0]["tokens"].device
    counted = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        counted += token_mask(b["labels"], b.get("loss_mask")).sum()
    _all_reduce_sum(counted, group)
    denom = counted.clamp(min=1.0)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        loss_sum, _ = _forward_loss(model, b, precision, device.type, z_loss)
        loss = loss_sum / denom.to(loss_sum.dtype)
        total = loss + _moe_aux(model, len(micro), group, aux)
        (total * loss_scale if loss_scale != 1.0 else total).backward()
        loss_total += loss.detach().double()
    _all_reduce_sum(loss_total, group)  # every rank's share of the global mean
    unscale_gradients(model, loss_scale)
    return loss_total


def _moe_aux(model: nn.Module, n_micro: int, group: Any, out: dict[str, float] | None) -> torch.Tensor | float:
    """This micro-batch's share of the MoE auxiliary loss (0.0 for dense models); logs into ``out``."""
    if not hasattr(model, "aux_loss"):
        return 0.0
    if out is not None:
        for key, value in model.aux_losses().items():
            out[key] = out.get(key, 0.0) + value.item() / n_micro
    weighted = model.aux_loss()
    if weighted is None:
        return 0.0
    dp = torch.distributed.get_world_size(group) if group is not None else 1
    return weighted / (n_micro * dp)


def unscale_gradients(model: nn.Module, loss_scale: float) -> None:
    """Divide the accumulated gradients by the fp16 loss scale (a no-op at scale 1)."""
    if loss_scale != 1.0:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / loss_scale)


@dataclass
class PipelineLoss:
    """The pipeline schedule's per-micro-batch loss: ``factor`` x the token-loss *sum*.

    The schedule divides gradients by the number of micro-batches and FSDP (``grad_reduction="mean"``
    in ``build_pipeline``) averages them over data-parallel ranks; ``factor`` = micro-batches x dp
    ranks x loss scale / global counted tokens undoes both, so the gradient is the global-mean
    gradient of ``accumulate_gradients`` even when micro-batches hold different token counts.
    """

    z_loss: float = 0.0
    factor: float = 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(logits, labels, None, self.z_loss)[0] * self.factor


def _pipeline_batch(micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One [acc x micro, seq] batch (the schedule splits it back into the micro-batches); labels are
    -100 where ``loss_mask`` is 0, the only way a stage's loss sees the mask."""
    labels = [
        torch.where(b["loss_mask"] > 0, b["labels"], torch.full_like(b["labels"], -100)) if "loss_mask" in b
        else b["labels"]
        for b in micro
    ]
    return torch.cat([b["tokens"] for b in micro]), torch.cat(labels)


def pipeline_gradients(
    pipe: Any,
    loss_fn: PipelineLoss,
    micro: list[dict[str, torch.Tensor]],
    precision: str = "fp32",
    loss_scale: float = 1.0,
    group: Any = None,
    dp_size: int = 1,
) -> torch.Tensor:
    """``accumulate_gradients`` for a ``neoxt.distributed.pipeline.Pipeline``: same loss, same gradients."""
    tokens, labels = _pipeline_batch(micro)
    counted = token_mask(labels, None).sum().double()
    _all_reduce_sum(counted, group)
    loss_fn.factor = len(micro) * dp_size * loss_scale / float(counted.clamp(min=1.0))
    with autocast(precision, tokens.device.type):
        loss = pipe.step(tokens if pipe.has_first else None, labels if pipe.has_last else None)
    loss = loss.double() / (dp_size * loss_scale)
    _all_reduce_sum(loss, group)
    for part in pipe.parts:
        unscale_gradients(part, loss_scale)
    return loss


@torch.no_grad()
def evaluate_pipeline(
    pipe: Any, loss_fn: PipelineLoss, source: BatchSource, iters: int, cfg: RunConfig, device: torch.device,
    group: Any = None,
) -> tuple[float, int]:
    """``evaluate`` through the pipeline's forward-only schedule."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    z_loss = loss_fn.z_loss
    for part in pipe.parts:
        part.eval()
    try:
        loss_fn.z_loss = 0.0
        for _ in range(iters):
            micro = [_move(next(source), device) for _ in range(cfg.training.gradient_accumulation_steps)]
            tokens, labels = _pipeline_batch(micro)
            count += token_mask(labels, None).sum().double()
            loss_fn.factor = float(len(micro))  # the schedule's mean over micro-batches -> their sum
            with autocast(cfg.training.precision, device.type):
                total += pipe.step(tokens if pipe.has_first else None, labels if pipe.has_last else None,
                                   train=False).double()
    finally:
        loss_fn.z_loss = z_loss
        for part in pipe.parts:
            part.train()
    _all_reduce_sum(total, group)
    _all_reduce_sum(count, group)
    return (total / count.clamp(min=1)).item(), int(count.item())


def _check_pipeline_config(cfg: RunConfig) -> None:
    """What the pipeline stages cannot do (they run the plain causal LM forward on whole batches)."""
    t, d = cfg.training, cfg.data
    if t.train_impl != "normal":
        raise ConfigError(f"pipe_parallel_size > 1 supports train_impl: normal only, not '{t.train_impl}'")
    for key, value in (("reset_position_ids", d.reset_position_ids), ("reset_attention_mask", d.reset_attention_mask)):
        if value:
            raise ConfigError(f"{key}: true is not supported with pipe_parallel_size > 1")
    if cfg.evaluation.eval_tasks:
        raise ConfigError("eval_tasks is not supported with pipe_parallel_size > 1 (validation loss is)")
    if cfg.model.moe_num_experts > 1:
        raise ConfigError("moe_num_experts > 1 is not supported with pipe_parallel_size > 1 (MoE aux losses "
                          "do not cross stages)")


def where_to_start(cfg: RunConfig, say: Callable[[str], None]) -> tuple[Path | None, str | None]:
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
        say(f"finetuning from weights in {c.load} (fresh optimizer, iteration {c.iteration or 0})")
        return None, c.load
    if c.load and c.save and Path(c.load).absolute() == Path(c.save).absolute():
        # GPT-NeoX's resume idiom (load = save): nothing saved there yet means a first run.
        say(f"starting from scratch (seed {cfg.training.seed}); '{c.save}' holds no checkpoint yet")
        return None, None
    if c.load:
        base = Path(c.load)
        target = base / ckpt.step_dir_name(c.iteration) if c.iteration is not None else ckpt.resolve_checkpoint(base)
        if not ckpt.is_checkpoint_dir(target):
            raise CheckpointError(f"load: {target}: not a complete neoxt checkpoint")
        say(f"resuming from {target} (load: {c.load})")
        return target, None
    say(f"starting from scratch (seed {cfg.training.seed})" + (f"; checkpoints go to {c.save}" if c.save else ""))
    return None, None


def train(
    cfg: RunConfig,
    config_yaml: str | None = None,
    *,
    data: TrainData | None = None,
    model: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    signals: SignalFlag | None = None,
) -> TrainResult:
    """Run (or continue) training as ``cfg`` says; see the module docstring for where it starts.

    ``data`` / ``model`` override what ``cfg`` would build (tests, benchmarks, post-training).
    ``stop_after``: return after this many steps of this call, without saving (tests simulate a kill).
    ``signals``: a flag the caller installed early (``neoxt train`` does, first thing); a signal it
    recorded before the first step stops the run there, without a save (see ``SignalFlag``).
    """
    rank, _ = _rank_world()
    say = log or (lambda msg: print(msg, flush=True) if rank == 0 else None)
    t_cfg, c_cfg = cfg.training, cfg.checkpoint
    if t_cfg.train_iters <= 0:
        raise ConfigError("train_iters must be set to a positive number of iterations")
    if t_cfg.train_impl not in ("normal", "dpo", "kto"):
        raise ConfigError(
            f"train_impl: '{t_cfg.train_impl}' is not supported yet (supported: normal (LM and SFT), dpo, kto)"
        )
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.optimizer.lr}")
    if model is None and cfg.model.padded_vocab_size is None:
        cfg = resolve_vocab(cfg)
        config_yaml = None  # the saved config must name the vocabulary size the weights have
    if config_yaml is None:
        from neoxt.config import config_to_yaml

        config_yaml = config_to_yaml(cfg)

    run_dir = Path(c_cfg.save) if c_cfg.save else (Path(cfg.logging.log_dir) if cfg.logging.log_dir else None)

    # Where do we start? Decided before anything is built, so it can be the first log line.
    resume_from, finetune_from = where_to_start(cfg, say)

    # Same seed on every rank: identical initial weights before sharding.
    seed_everything(t_cfg.seed)
    from neoxt.distributed.mesh import build_mesh, dp_group, dp_rank_size, init_distributed
    from neoxt.distributed.parallelize import clip_grad_norm_ as sharded_clip_grad_norm_
    from neoxt.distributed.parallelize import parallelize

    pipelined = cfg.parallelism.pipe_parallel_size > 1
    if pipelined:
        _check_pipeline_config(cfg)
    init_distributed()
    mesh = build_mesh(cfg.parallelism)
    dp_rank, dp_size = dp_rank_size(mesh)
    group = dp_group(mesh)
    device = _device()
    if model is None:
        model = build_model(cfg, device)
    st = _State()
    if finetune_from is not None:  # into the whole model, before it is split or sharded
        loaded = load_weights(finetune_from, model)
        st.iteration = int(c_cfg.iteration or 0)
        say(f"loaded weights from {loaded}")
    objective = None
    if t_cfg.train_impl in ("dpo", "kto"):
        from neoxt.train.posttrain import build_objective

        # Before parallelize: the frozen reference is a copy of the whole starting model (FSDP modules
        # cannot be deep-copied), parallelized like the policy so its forwards shard the same way.
        load_src = c_cfg.load
        objective = build_objective(
            cfg, model, (lambda m: load_weights(load_src, m)) if load_src else None,
            fresh_start=resume_from is None, group=group, prepare=lambda m: parallelize(m, cfg, mesh),
        )
    pipe, pipe_loss = None, PipelineLoss(z_loss=t_cfg.z_loss)
    if pipelined:
        from neoxt.distributed.pipeline import build_pipeline

        assert mesh is not None  # pipe_parallel_size > 1 needs as many processes
        # Each rank keeps only its stages (parallelized inside: TP/AC/compile/FSDP), named as in the
        # whole model, so checkpoints load into any layout.
        pipe = build_pipeline(model, cfg, mesh, n_microbatches=t_cfg.gradient_accumulation_steps, loss_fn=pipe_loss)
        parts = list(pipe.parts)
        model = None
    else:
        # Every model, a caller's too: with several data-parallel ranks this applies FSDP2, which
        # reduces the gradients (the loop only sums token counts and loss shares).
        parts = [parallelize(model, cfg, mesh)]
    if group is not None and not any(_is_sharded(p) for p in parts):
        raise RuntimeError("data-parallel training needs a model parallelized with FSDP2 (neoxt.distributed.parallelize)")
    for part in parts:
        part.train()
    if data is None:
        data = open_train_data(cfg, dp_rank, dp_size)
    optimizers = [build_optimizer(part, cfg.optimizer) for part in parts]
    schedule = build_schedule(cfg.schedule, cfg.optimizer.lr, t_cfg.train_iters)
    scaler = LossScaler.from_config(t_cfg)

    if resume_from is not None:
        saved_schedule = _load_full(resume_from, parts, optimizers, scaler, data, cfg, st, say, pipelined)
        schedule = _reconcile_schedule(schedule, saved_schedule, cfg, say)
    if c_cfg.no_save_optim and c_cfg.save:
        say("warning: no_save_optim is set: checkpoints hold no optimizer state, so a run resumed from "
            "them (e.g. the next job of a chain) cannot continue exactly")

    start_iteration = st.iteration
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    sharded = pipelined or any(_is_sharded(p) for p in parts)
    pp_mesh = mesh["pp"] if pipelined and mesh is not None else None
    clip = cfg.optimizer.gradient_clipping
    grad_acc = t_cfg.gradient_accumulation_steps
    save_iters, save_factor = _save_iterations(cfg)
    exit_interval = t_cfg.exit_interval
    is_fp16_dynamic = t_cfg.precision == "fp16" and scaler.dynamic
    seq_len = cfg.data.seq_length

    try:
        from neoxt.model import flops_per_token

        fpt = flops_per_token(cfg.model, seq_len) if cfg.model.padded_vocab_size else 0.0
    except (ImportError, ValueError):
        fpt = 0.0
    metrics = MetricsLogger(
        run_dir=run_dir,
        train_iters=t_cfg.train_iters,
        flops_per_token=fpt,
        peak_tflops=cfg.logging.peak_theoretical_tflops or default_peak_tflops(device.type),
        log_interval=cfg.logging.log_interval,
        tensorboard_dir=cfg.logging.tensorboard_dir,
        wandb=wandb_settings(cfg.logging, run_dir),
        enabled=rank == 0,
        nan_count=st.nan_count,
        skipped_count=st.skipped_count,
    )
    result = TrainResult(iteration=st.iteration, status="finished", start_iteration=start_iteration, resumed_from=resume_from)

    def save_now(data_state: dict[str, Any] | None = None) -> Path | None:
        if not c_cfg.save:
            return None
        state = _checkpoint_state(
            parts, optimizers, st, schedule.state_dict(st.iteration), scaler, data, data_state, cfg, pipelined
        )
        path = _save(Path(c_cfg.save), st, state, config_yaml, say)
        removed = ckpt.prune_checkpoints(c_cfg.save, c_cfg.keep_last_n_checkpoints) if rank == 0 else []
        for p in removed:
            say(f"removed old checkpoint {p}")
        result.last_checkpoint = path
        return path

    status = "failed"
    own_signals = signals is None
    signals = (signals or SignalFlag()).install()
    try:
        if _any_rank(signals.received is not None, device):
            # During start-up: nothing has changed since the state we started from, so no save.
            name = signal.Signals(signals.received).name if signals.received else "a signal (another rank)"
            say(f"received signal {name} before the first step: exiting at iteration {st.iteration} "
                "without saving (nothing new to save)")
            result.status = "signal"
            status = "interrupted"
        else:
            if st.iteration in save_iters and resume_from is None:
                save_now()  # e.g. extra_save_iters: [0] keeps the base model
            steps_this_call = 0
            while st.iteration < t_cfg.train_iters:
                t0 = time.perf_counter()
                data_state_before = data.train.state_dict()
                micro = [_move(next(data.train), device) for _ in range(grad_acc)]
                lr = schedule.lr_at(st.iteration)
                for optimizer in optimizers:
                    set_lr(optimizer, lr)
                aux: dict[str, float] = {}  # MoE auxiliary losses for the log
                if objective is not None:
                    loss_total = objective(micro, scaler.scale)
                elif pipe is not None:
                    loss_total = pipeline_gradients(
                        pipe, pipe_loss, micro, t_cfg.precision, scaler.scale, group, dp_size
                    )
                else:
                    loss_total = accumulate_gradients(
                        model, micro, t_cfg.precision, scaler.scale, t_cfg.z_loss, group, aux
                    )
                max_norm = clip if clip and clip > 0 else float("inf")
                if sharded:
                    grad_norm = sharded_clip_grad_norm_(params, max_norm, pp_mesh=pp_mesh)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, foreach=True)
                loss_value = loss_total.item()
                norm_value = float(grad_norm)
                loss_ok, norm_ok = math.isfinite(loss_value), math.isfinite(norm_value)
                overflow = is_fp16_dynamic and loss_ok and not norm_ok
                nan = not loss_ok or (not norm_ok and not overflow)
                if nan or overflow:
                    for optimizer in optimizers:
                        optimizer.zero_grad(set_to_none=True)
                    if nan and t_cfg.on_nan == "stop":
                        st.nan_count += 1
                        metrics.nan_count = st.nan_count
                        # The state before this step is the last good one (weights and optimizer are
                        # untouched, the data position is rewound to this step's first batch).
                        path = save_now(data_state_before)
                        status = "failed"
                        where = f"; last good state saved to {path}" if path else ""
                        raise TrainingStopped(
                            f"non-finite {'loss' if not loss_ok else 'gradient norm'} at iteration "
                            f"{st.iteration + 1} (on_nan: stop){where}"
                        )
                else:
                    for optimizer in optimizers:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                scaler.update(overflow)
                if nan:
                    st.nan_count += 1
                if overflow or nan:
                    st.skipped_count += 1

                st.iteration += 1
                tokens = sum(int(b["tokens"].numel()) for b in micro) * dp_size
                st.consumed_tokens += tokens
                st.consumed_samples += sum(int(b["tokens"].shape[0]) for b in micro) * dp_size
                result.losses.append(loss_value if not (nan or overflow) else float("nan"))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stats = StepStats(
                    iteration=st.iteration,
                    loss=loss_value,
                    lr=lr,
                    grad_norm=norm_value,
                    tokens=tokens,
                    seconds=time.perf_counter() - t0,
                    skipped=nan or overflow,
                    loss_scale=scaler.scale if t_cfg.precision == "fp16" else None,
                    extra=aux,
                )
                metrics.record(stats, nan)

                if data.valid is not None and t_cfg.eval_interval and st.iteration % t_cfg.eval_interval == 0:
                    with torch.random.fork_rng(devices=[]):
                        if pipe is not None:
                            v_loss, v_tokens = evaluate_pipeline(
                                pipe, pipe_loss, data.valid, t_cfg.eval_iters, cfg, device, group
                            )
                        else:
                            v_loss, v_tokens = evaluate(
                                model, data.valid, t_cfg.eval_iters, cfg, device, objective, group
                            )
                    metrics.record_eval(st.iteration, v_loss, v_tokens)
                if cfg.evaluation.eval_tasks and t_cfg.eval_interval and st.iteration % t_cfg.eval_interval == 0:
                    metrics.record_task_scores(st.iteration, _eval_tasks(model, cfg, st.iteration, rank))

                steps_this_call += 1
                at_exit_interval = bool(exit_interval) and st.iteration % exit_interval == 0
                wants_save = st.iteration in save_iters or (save_factor and st.iteration % save_factor == 0)
                if _any_rank(signals.received is not None, device):
                    save_now()
                    name = signal.Signals(signals.received).name if signals.received else "a signal (another rank)"
                    say(f"received signal {name}: saved at iteration {st.iteration}, exiting")
                    result.status = "signal"
                    status = "interrupted"
                    break
                if wants_save or at_exit_interval or st.iteration == t_cfg.train_iters:
                    save_now()
                if stop_after is not None and steps_this_call >= stop_after:
                    result.status = "killed"
                    status = "running"  # what a real kill leaves behind
                    break
                if at_exit_interval and st.iteration < t_cfg.train_iters:
                    say(f"exit_interval {exit_interval}: stopping at iteration {st.iteration}")
                    result.status = "exit_interval"
                    status = "interrupted"
                    break
            else:
                status = "finished"
    finally:
        if own_signals:
            signals.restore()
        metrics.close(st.iteration, status)
    result.iteration = st.iteration
    result.nan_count = st.nan_count
    if result.status == "finished":
        say(f"training finished at iteration {st.iteration}")
    return result


class _DictBatches:
    """Adapts ``neoxt.data.loader.BatchLoader`` (``Batch`` objects) to the dict micro-batches here."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __iter__(self) -> _DictBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        b = next(self.loader)
        out = {"tokens": b.tokens, "labels": b.labels, "loss_mask": b.loss_mask, "position_ids": b.position_ids}
        if b.document_ids is not None:
            out["attention_mask"] = b.attention_mask()
        for extra in ("ref", "reward"):
            if getattr(b, extra, None) is not None:
                out[extra] = getattr(b, extra)
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def open_train_data(cfg: RunConfig, dp_rank: int = 0, dp_size: int = 1) -> TrainData:
    """Train/valid micro-batch sources for ``cfg`` from ``neoxt.data.loader`` (this rank's slice)."""
    from neoxt.data.loader import build_loader

    eod_id = None
    d = cfg.data
    if d.eod_mask_loss or d.reset_position_ids or d.reset_attention_mask:
        from neoxt.tokenizer import load_tokenizer

        eod_id = load_tokenizer(cfg.tokenizer).eod_id
    if dp_size != cfg.training.data_parallel_size:
        raise ConfigError(
            f"the config's data-parallel size {cfg.training.data_parallel_size} (from WORLD_SIZE when it was "
            f"loaded) differs from the {dp_size} data-parallel ranks running; load the config in the job"
        )
    train = build_loader(cfg, "train", dp_rank=dp_rank, eod_id=eod_id)
    if train is None:
        raise ConfigError("no training data: set data_path or train_data_paths")
    valid = build_loader(cfg, "valid", dp_rank=dp_rank, eod_id=eod_id) if cfg.training.eval_iters > 0 else None
    return TrainData(_DictBatches(train), _DictBatches(valid) if valid is not None else None)
