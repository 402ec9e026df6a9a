"""The objective interface: what the training loop asks of LM/SFT, DPO, KTO, the pipeline schedule and
every objective added later (reward model, REINFORCE, gradient ascent / difference); MoE auxiliary
losses join an objective's backward through ``moe_aux_term``.

The loop (``neoxt.train.loop``) never branches on ``train_impl``: it builds the objective named by
``train_impl`` from the registry (``neoxt.train.objectives.OBJECTIVES``) and then only calls this
surface::

    factory(ctx: ObjectiveContext) -> Objective          # setup hook, once, before any resume
    factory.check_config(cfg) -> None                     # optional: config checks before anything is built
    factory.open_data(cfg, dp_rank, dp_size) -> BatchSource | None   # optional: its own training data

    objective.parts: list[nn.Module]                      # what the optimizers step and checkpoints hold
    objective.model: nn.Module | None                     # the whole model for eval tasks (None: pipeline)
    objective.train_batch(micro, loss_scale) -> StepOutcome   # forward + backward of one global batch
    objective.eval_batch(micro) -> StepOutcome            # forward only, no gradients
    objective.state_dict() -> dict                        # extra state saved in every checkpoint
    objective.load_state_dict(state) -> None              # ... and restored on resume (before step 1)

Contract of ``train_batch``: ``micro`` is this rank's ``gradient_accumulation_steps`` micro-batches
(dicts of tensors, already on the device; see ``neoxt.train.setup.BatchSource``). Leave in ``.grad``
the gradient of the step's loss *multiplied by* ``loss_scale`` (the fp16 scale; 1 otherwise): the
step (``neoxt.train.step``) unscales, clips, checks finiteness, applies the NaN / fp16-overflow
policy and steps the optimizers, so objectives hold no such policy. ``StepOutcome.loss`` is the
global-batch value, identical on every rank (sum shares over ``ctx.group`` with
``neoxt.distributed.mesh.all_reduce_sum``). ``eval_batch`` returns the same with ``weight`` set to
how much the batch counts in the validation mean (counted tokens for the LM loss, 1 per batch for a
per-batch mean) and ``tokens`` the counted tokens reported.

Extension points later objectives need:

(a) **Own data and sampling state.** A factory may open further data sources from ``ctx.cfg`` (e.g.
    a forget set for gradient ascent, prompts for REINFORCE). Whatever ``state_dict()`` returns is
    saved in each checkpoint under ``"objective"`` (a nested dict of tensors, numbers and strings,
    as DCP stores it) and handed back to ``load_state_dict`` on an exact resume, so iterator
    positions and sampling RNG states put there resume bit-identically. ``state_dict()`` must
    return the same keys before and after a step (it is also the template DCP loads into).
(b) **Extra metrics.** ``StepOutcome.metrics`` (name -> float, e.g. ``forget_loss``,
    ``retain_loss``, ``moe_aux_loss``) go into ``metrics.jsonl`` and the console line under their
    names (averaged over the log interval).
(c) **Steps that do not advance the counter.** ``StepOutcome.advance = False`` makes the loop apply
    the update and log the outcome but leave ``iteration``, the LR schedule, checkpoint and
    evaluation triggers where they are, and draw the next global batch for the same iteration (e.g.
    a gradient-ascent burst of several updates per iteration). An objective may equally run a burst
    inside one ``train_batch`` and report it as one step.
(d) **Its own batches in the train stream.** An objective with a ``train_source(train) -> BatchSource``
    method is handed the run's train source once (before any resume) and returns the source the loop
    draws from instead (e.g. one that serves forget-set batches on gradient-ascent steps and the LM
    batches otherwise, so no LM batch is drawn and dropped). Its ``state_dict`` is the checkpoint's
    ``data.train`` and is rewound with it (``on_nan: stop``), so a schedule kept there stays exact.
(e) **Update-specific learning rate and loss accounting.** ``StepOutcome.lr_scale`` multiplies the
    schedule's learning rate for this update only (e.g. ``ga_lr_scale``); ``StepOutcome.in_loss =
    False`` keeps the step's ``loss`` out of the logged ``lm_loss`` average (its named metrics still
    report it), as GPT-NeoX's fork drops ``lm_loss`` from its gradient-ascent iterations.
(f) **Own training data.** ``factory.open_data`` may return the batch source the loop draws from
    instead of the config's datasets (REINFORCE's JSONL prompts); None keeps the config's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from neoxt.config.schema import RunConfig
from neoxt.errors import ConfigError
from neoxt.train.chunked_loss import linear_cross_entropy, linear_token_logprobs
from neoxt.train.losses import label_logprobs, lm_loss_sum, token_mask
from neoxt.train.precision import autocast


@dataclass
class StepOutcome:
    """What one objective step (or evaluation batch) produced."""

    loss: torch.Tensor  # float64 scalar, the global-batch loss, identical on every rank
    tokens: int = 0  # counted (loss-bearing) tokens of the global batch (reported by eval; optional in training)
    weight: float = 1.0  # evaluation: how much this batch counts in the validation mean
    metrics: dict[str, float] = field(default_factory=dict)  # extra named metrics for the log
    advance: bool = True  # False: an update that does not advance the iteration counter
    lr_scale: float = 1.0  # this update's learning rate is the schedule's times this
    in_loss: bool = True  # False: leave this step's loss out of the logged lm_loss average


@dataclass(frozen=True)
class ObjectiveContext:
    """What a factory gets to build its objective (``model`` is whole and not yet parallelized)."""

    cfg: RunConfig
    model: nn.Module
    mesh: Any  # torch DeviceMesh or None (one process)
    group: Any  # data-parallel process group or None (one data-parallel rank)
    dp_size: int
    device: torch.device
    fresh_start: bool  # False when the run resumes from a checkpoint
    load_weights: Callable[[nn.Module], Any] | None  # fills a module with the ``load`` weights, if any
    parallelize: Callable[[nn.Module], nn.Module]  # FSDP2 / TP / AC / compile as the config says
    say: Callable[[str], None] = print


class Objective(Protocol):
    """One training objective; see the module docstring for the contract."""

    parts: list[nn.Module]
    model: nn.Module | None

    def train_batch(self, micro: list[dict[str, torch.Tensor]], loss_scale: float) -> StepOutcome: ...

    def eval_batch(self, micro: list[dict[str, torch.Tensor]]) -> StepOutcome: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ObjectiveFactory = Callable[[ObjectiveContext], Objective]


class Stateless:
    """Mixin for objectives with no state beyond the model and optimizer."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], precision: str, head: Any = None) -> torch.Tensor:
    """The one micro-batch forward every objective uses: logits under the run's autocast (or what
    ``head(final hidden, output weight)`` returns instead, see ``Transformer.forward``)."""
    with autocast(precision, batch["tokens"].device.type):
        extra = {} if head is None else {"head": head}
        return model(batch["tokens"], positions=batch.get("position_ids"), attn_mask=batch.get("attention_mask"),
                     **extra)


def loss_chunk_size(cfg: RunConfig) -> int:
    """Tokens per output-projection chunk for the run (0: full logits). Tensor parallel keeps full
    logits: its head is a column-sharded module whose output layout the chunked path would bypass."""
    chunk = cfg.training.loss_chunk_size
    if chunk < 0:
        raise ConfigError(f"loss_chunk_size must be >= 0 (0 turns chunking off), got {chunk}")
    return 0 if cfg.parallelism.model_parallel_size > 1 else chunk


def token_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], precision: str, z_loss: float = 0.0, chunk: int = 0
) -> torch.Tensor:
    """The one LM / SFT loss path: summed cross-entropy (+ z-loss) over the batch's counted tokens,
    projected in ``chunk``-token pieces when ``chunk`` > 0 (same value and gradients)."""
    labels, loss_mask = batch["labels"], batch.get("loss_mask")
    if not chunk:
        return lm_loss_sum(forward_logits(model, batch, precision), labels, loss_mask, z_loss)[0]
    mask = token_mask(labels, loss_mask)
    return forward_logits(model, batch, precision,
                          head=lambda h, w: linear_cross_entropy(h, w, labels, mask, z_loss, chunk))


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], precision: str, chunk: int = 0) -> torch.Tensor:
    """The one per-token log p(label) path (fp32, 0 where not counted) -> [B, T], for DPO / KTO and
    later post-training objectives; chunked like ``token_loss_sum``."""
    labels = batch["labels"]
    mask = token_mask(labels, batch.get("loss_mask"))
    if chunk:
        return forward_logits(model, batch, precision,
                              head=lambda h, w: linear_token_logprobs(h, w, labels, mask, chunk))
    return label_logprobs(forward_logits(model, batch, precision), labels, mask)


def accumulate(
    micro: list[dict[str, torch.Tensor]],
    micro_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    loss_scale: float = 1.0,
    backward: bool = True,
    aux_loss: Callable[[], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Sum of ``micro_loss(b)`` over the micro-batches (float64, detached); with ``backward`` each
    micro-batch's loss (times ``loss_scale``) is backpropagated as soon as it is computed, so only one
    micro-batch's activations are alive at a time. ``micro_loss`` returns the micro-batch's share of
    the global loss (already divided by the global count). ``aux_loss`` (called right after each
    training ``micro_loss``, so it sees that call's forwards) is a term that joins that micro-batch's
    backward but not the returned loss (MoE auxiliary losses, see ``moe_aux_term``); None from it
    adds nothing. It is scaled by ``|loss_scale|``: a gradient-ascent step (negative scale, see
    ``objectives/unlearning.py``) ascends the loss but still descends the experts' balancing losses."""
    device = micro[0]["tokens"].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        if backward:
            loss = micro_loss(b)
            extra = aux_loss() if aux_loss is not None else None
            scaled = loss * loss_scale if loss_scale != 1.0 else loss
            if extra is not None:  # a regulariser: descended even where the loss is ascended (scale < 0)
                scaled = scaled + extra * abs(loss_scale)
            scaled.backward()
        else:
            with torch.no_grad():
                loss = micro_loss(b)
        total += loss.detach().double()
    return total


def moe_aux_term(
    model: nn.Module, n_micro: int, group: Any = None, out: dict[str, float] | None = None
) -> Callable[[], torch.Tensor | None] | None:
    """The MoE auxiliary losses as ``accumulate``'s ``aux_loss``, shared by every objective that adds them.

    Each call reads the router statistics of ``model``'s last training forward (each MoE layer keeps
    its own; a frozen reference is another module in eval mode and records none) and returns that
    micro-batch's share of the weighted loss, ``model.aux_loss()`` / (micro-batches x data-parallel
    ranks): a mean over them, whatever the objective's own loss averages over. None when there is
    nothing to add (a dense model, both coefficients 0), so such a step is unchanged. ``out`` (when
    given) receives this rank's unweighted losses averaged over its micro-batches, the
    ``moe_aux_loss`` / ``moe_z_loss`` metrics. The objective's ``micro_loss`` must run the policy's
    training forward last (any reference forward before it). None for a model without ``aux_loss``.
    """
    if not hasattr(model, "aux_loss"):
        return None
    dp = torch.distributed.get_world_size(group) if group is not None else 1

    def share() -> torch.Tensor | None:
        if out is not None:
            for key, value in model.aux_losses().items():
                out[key] = out.get(key, 0.0) + value.item() / n_micro
        weighted = model.aux_loss()
        return None if weighted is None else weighted / (n_micro * dp)

    return share
