"""Pipeline parallel with ``torch.distributed.pipelining``: a manual split of our blocks into stages.

Why a manual split: tracing-based splitting needs a graph-exportable model and splits wherever it
likes; our blocks are the natural cut points and the split must keep parameter names, so that a
checkpoint written by a pipelined run loads into an unpipelined one (DCP merges the stages' keys).
Each stage is a copy of the whole ``Transformer`` with what it does not own removed: ``layers``
becomes a ``ModuleDict`` keyed by the *global* block index (names stay ``layers.{i}.…``), ``embed``
lives only on the first stage, ``final_norm``/``lm_head`` only on the last; the stage's forward is
``Transformer.forward`` itself, which handles the parts a stage lacks.

Schedules: ``1f1b`` and ``gpipe`` run one stage per rank; ``interleaved_1f1b`` runs ``virtual``
stages per rank in the loop order (stage s on pp rank s % pp), which shrinks the pipeline bubble.
Tied embeddings are refused with more than one stage: the head would need the first stage's matrix.

Gradients: the schedule divides them by the number of micro-batches and the loss is a per-micro-batch
mean, so a step equals one step on the whole batch when micro-batches hold as many counted tokens
(always true for packed pretraining data).

Loss without full logits (``head_loss``): the last stage would otherwise return [micro, seq, vocab]
logits for the schedule's ``loss_fn`` (1.6 GB per sequence in fp32 at seq 8192 and a 50k vocabulary).
With a ``head_loss`` the labels travel into the stages' forward as a keyword argument (the schedule
splits them into micro-batches like the tokens) and the last stage computes the micro-batch's loss
*inside* its forward through ``Transformer.forward``'s ``head`` hook, e.g. projecting in chunks
(``neoxt.train.chunked_loss``). Inside the forward is where FSDP has the output weight unsharded, so
its gradient reaches FSDP's reduce-scatter exactly as through ``lm_head``; the stage's output is then
the loss itself (a scalar: nothing of the vocabulary's size crosses the schedule) and ``loss_fn`` is
not used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from neoxt.config.schema import RunConfig
from neoxt.distributed.mesh import all_reduce_sum
from neoxt.distributed.parallelize import parallelize
from neoxt.errors import ConfigError

IGNORE_INDEX = -100


class StageLayers(nn.ModuleDict):
    """The blocks one stage owns, keyed by global index; iterates over the blocks like a ModuleList."""

    def __iter__(self) -> Iterator[nn.Module]:  # type: ignore[override]
        return iter(self.values())


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, as-even-as-possible block ranges; earlier stages get the extra block (the last
    stage also carries the head)."""
    if num_stages > num_layers:
        raise ConfigError(f"num_layers={num_layers} is fewer than the {num_stages} pipeline stages")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def make_stage_module(model: nn.Module, layer_range: range, first: bool, last: bool) -> nn.Module:
    """A deep copy of ``model`` holding only what stage ``layer_range`` computes; its forward is
    ``Transformer.forward``, which runs whatever parts a stage holds."""
    part = copy.deepcopy(model)
    part.layers = StageLayers({str(i): part.layers[i] for i in layer_range})
    if not first:
        part.embed = None
        part.pos_embed = None
    if not last:
        part.final_norm = None
        part.lm_head = None
    return part


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of one micro-batch (labels < 0 ignored), computed in fp32."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``head_loss(final hidden [micro, seq, H], output weight [V, H], labels [micro, seq])`` -> the
micro-batch's loss, as ``loss_fn`` would compute it from the logits ``hidden @ weight.T``."""


def _labels_to_head(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], head_loss: HeadLoss | None
) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook of every stage when the pipeline has a ``head_loss``: the schedule hands the
    ``labels`` keyword to all stages of the last stage's rank, so each drops it; the last stage turns
    it into the ``head`` that makes ``Transformer.forward`` return the loss instead of logits."""
    labels = kwargs.pop("labels", None)
    if head_loss is not None and labels is not None:
        kwargs["head"] = lambda hidden, weight: head_loss(hidden, weight, labels)
    return args, kwargs


def _stage_output_is_the_loss(loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The schedule's ``loss_fn`` when the last stage already returns the loss (``head_loss``)."""
    return loss


@dataclass
class Pipeline:
    """The stages this rank runs and the schedule that drives them.

    ``parts`` are the stage modules (give all their parameters to the optimizer and to DCP: their
    state-dict keys are the full model's names). ``step`` runs forward+backward of one global batch.
    """

    schedule: object
    stages: list
    parts: list[nn.Module]
    has_first: bool
    has_last: bool
    pp_mesh: DeviceMesh
    labels_in_forward: bool = False  # a head_loss: the last stage's forward takes the labels

    def step(self, tokens: torch.Tensor | None, labels: torch.Tensor | None, train: bool = True) -> torch.Tensor:
        """Forward + backward (``train=False``: forward only, e.g. evaluation) over ``n_microbatches``
        micro-batches; returns the mean loss on every rank.

        ``tokens`` is needed on the rank with the first stage, ``labels`` on the rank with the last.
        """
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.has_first else ()
        # return_outputs=False: the schedule would otherwise keep every micro-batch's output (the
        # logits, without a head_loss) alive until the step ends, only to concatenate them.
        kwargs: dict[str, Any] = {"return_outputs": False}
        if self.has_last:
            kwargs.update(target=labels, losses=losses)
            if self.labels_in_forward:
                kwargs["labels"] = labels
        if train:
            self.schedule.step(*args, **kwargs)
        else:
            with torch.no_grad():
                self.schedule.eval(*args, **kwargs)
        device = self.stages[0].device
        loss = torch.stack(losses).mean().detach().float() if self.has_last else torch.zeros((), device=device)
        loss = loss.to(device)
        return all_reduce_sum(loss, self.pp_mesh.get_group())  # only the last stage's rank adds a value

    def parameters(self) -> Iterator[nn.Parameter]:
        for p in self.parts:
            yield from p.parameters()


SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")


def build_pipeline(
    model: nn.Module,
    cfg: RunConfig,
    mesh: DeviceMesh,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
    virtual_stages: int = 2,
    head_loss: HeadLoss | None = None,
) -> Pipeline:
    """Split ``model`` over ``mesh["pp"]``, parallelize each stage (TP/AC/compile/FSDP), build the schedule.

    ``model`` is the full model, identical on every rank (same seed); the parts this rank does not
    run are dropped. ``n_microbatches`` must be >= the number of pp ranks (and a multiple of it for
    the interleaved schedule). ``loss_fn(logits, labels)`` is the micro-batch loss; a ``head_loss``
    replaces it and computes that loss inside the last stage's forward from the final hidden states
    and the output weight, so the full logits are never built (see the module docstring). Tensor
    parallel has no ``head_loss``: its head is a column-sharded module whose output layout the
    hidden-state path would bypass.
    """
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    par = cfg.parallelism
    pp_mesh = mesh["pp"]
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    if par.pipeline_schedule not in SCHEDULES:
        raise ConfigError(f"pipeline_schedule {par.pipeline_schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if head_loss is not None and mesh["tp"].size() > 1:
        raise ValueError("head_loss needs model_parallel_size 1 (a tensor-parallel head keeps full logits)")
    if pp > 1 and model.cfg.tie_word_embeddings:
        raise ConfigError("pipe_parallel_size > 1 needs no_weight_tying: true (the head is on another stage)")
    if head_loss is not None:
        loss_fn = _stage_output_is_the_loss
    interleaved = par.pipeline_schedule == "interleaved_1f1b"
    v = virtual_stages if interleaved else 1
    num_stages = pp * v
    if n_microbatches < pp or (interleaved and n_microbatches % pp):
        raise ConfigError(
            f"gradient_accumulation_steps={n_microbatches} micro-batches: need at least pipe_parallel_size={pp}"
            + (" and a multiple of it for interleaved_1f1b" if interleaved else "")
        )
    ranges = split_layers(model.cfg.num_layers, num_stages)
    device = next(model.parameters()).device
    stages, parts = [], []
    for s in range(pp_rank, num_stages, pp):
        part = make_stage_module(model, ranges[s], first=s == 0, last=s == num_stages - 1)
        # The schedule's loss is a per-micro-batch mean, so data-parallel gradients are averaged.
        parallelize(part, cfg, mesh, reshard_after_forward=False, grad_reduction="mean")
        if head_loss is not None:
            last = s == num_stages - 1
            part.register_forward_pre_hook(partial(_labels_to_head, head_loss=head_loss if last else None),
                                           with_kwargs=True)
        parts.append(part)
        stages.append(PipelineStage(part, s, num_stages, device, group=pp_mesh.get_group()))
    if interleaved:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    else:
        cls = Schedule1F1B if par.pipeline_schedule == "1f1b" else ScheduleGPipe
        schedule = cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    return Pipeline(
        schedule=schedule,
        stages=stages,
        parts=parts,
        has_first=any(st.is_first for st in stages),
        has_last=any(st.is_last for st in stages),
        pp_mesh=pp_mesh,
        labels_in_forward=head_loss is not None,
    )
