"""The language-model objective through a pipeline schedule (``pipe_parallel_size > 1``).

Same loss and gradients as ``lm.py``: the schedule's per-micro-batch loss is ``factor`` x the token
loss *sum*, where ``factor`` undoes the schedule's division by the number of micro-batches and
FSDP's mean over data-parallel ranks (``grad_reduction="mean"`` in ``build_pipeline``), and divides
by the global counted tokens, so the gradient is the global-mean gradient even when micro-batches
hold different token counts. Each rank's stages (named as in the whole model) are its ``parts``:
each gets an optimizer and goes into checkpoints.

As for LM / SFT (``loss_chunk_size``, default 1024), the last stage never holds the full
[micro, seq, vocab] logits: ``PipelineLoss.from_hidden`` is the pipeline's ``head_loss``, run inside
the last stage's forward, which projects ``loss_chunk_size`` tokens at a time
(``neoxt.train.chunked_loss``) with the same loss and gradients. ``loss_chunk_size: 0`` and tensor
parallel (``loss_chunk_size()`` is 0 then) keep the logits path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neoxt.config.schema import RunConfig
from neoxt.distributed.mesh import all_reduce_sum
from neoxt.errors import ConfigError
from neoxt.train.chunked_loss import linear_cross_entropy
from neoxt.train.losses import lm_loss_sum, token_mask
from neoxt.train.objectives.base import ObjectiveContext, Stateless, StepOutcome, loss_chunk_size
from neoxt.train.precision import autocast


@dataclass
class PipelineLoss:
    """The schedule's per-micro-batch loss: ``factor`` x the token-loss sum (see the module docstring),
    from the logits (``__call__``) or, without them, from the final hidden states (``from_hidden``)."""

    z_loss: float = 0.0
    factor: float = 1.0
    chunk: int = 1024  # tokens per output-projection chunk in from_hidden
    recompute: bool = False  # GPipe: recompute the chunks' logits in backward (chunked_loss.linear_cross_entropy)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(logits, labels, None, self.z_loss)[0] * self.factor

    def from_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same loss from ``hidden @ weight.T`` computed ``chunk`` tokens at a time."""
        mask = token_mask(labels, None)
        return linear_cross_entropy(hidden, weight, labels, mask, self.z_loss, self.chunk, self.recompute) * self.factor


def pipeline_batch(micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One [acc x micro, seq] batch (the schedule splits it back into the micro-batches); labels are
    -100 where ``loss_mask`` is 0, the only way a stage's loss sees the mask."""
    labels = [
        torch.where(b["loss_mask"] > 0, b["labels"], torch.full_like(b["labels"], -100)) if "loss_mask" in b
        else b["labels"]
        for b in micro
    ]
    return torch.cat([b["tokens"] for b in micro]), torch.cat(labels)


def check_pipeline_config(cfg: RunConfig) -> None:
    """What the pipeline stages cannot do (they run the plain causal LM forward on whole batches)."""
    d = cfg.data
    for key, value in (("reset_position_ids", d.reset_position_ids), ("reset_attention_mask", d.reset_attention_mask)):
        if value:
            raise ConfigError(f"{key}: true is not supported with pipe_parallel_size > 1")
    if cfg.evaluation.eval_tasks:
        raise ConfigError("eval_tasks is not supported with pipe_parallel_size > 1 (validation loss is)")
    if cfg.model.moe_num_experts > 1:
        raise ConfigError("moe_num_experts > 1 is not supported with pipe_parallel_size > 1 (MoE aux losses "
                          "do not cross stages)")


class PipelineObjective(Stateless):
    """``neoxt.distributed.pipeline.Pipeline`` driven with the LM loss."""

    model = None  # no whole model on any rank: eval tasks are refused (check_pipeline_config)
    check_config = staticmethod(check_pipeline_config)

    def __init__(self, ctx: ObjectiveContext):
        from neoxt.distributed.pipeline import build_pipeline

        assert ctx.mesh is not None  # pipe_parallel_size > 1 needs as many processes
        t = ctx.cfg.training
        chunk = loss_chunk_size(ctx.cfg)
        # GPipe runs every micro-batch's forward before any backward: recompute rather than hold one
        # [V, H] weight gradient per micro-batch on the last stage.
        gpipe = ctx.cfg.parallelism.pipeline_schedule == "gpipe"
        self.loss_fn = PipelineLoss(z_loss=t.z_loss, chunk=chunk, recompute=gpipe)
        self.pipe = build_pipeline(ctx.model, ctx.cfg, ctx.mesh, n_microbatches=t.gradient_accumulation_steps,
                                   loss_fn=self.loss_fn, head_loss=self.loss_fn.from_hidden if chunk else None)
        self.parts = list(self.pipe.parts)
        self.precision, self.group, self.dp_size = t.precision, ctx.group, ctx.dp_size

    def _run(self, micro: list[dict[str, torch.Tensor]], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = pipeline_batch(micro)
        with autocast(self.precision, tokens.device.type):
            loss = self.pipe.step(tokens if self.pipe.has_first else None, labels if self.pipe.has_last else None,
                                  train=train)
        return loss, labels

    def train_batch(self, micro: list[dict[str, torch.Tensor]], loss_scale: float) -> StepOutcome:
        _, labels = pipeline_batch(micro)
        counted = all_reduce_sum(token_mask(labels, None).sum().double(), self.group)
        self.loss_fn.factor = len(micro) * self.dp_size * loss_scale / float(counted.clamp(min=1.0))
        loss, _ = self._run(micro, train=True)
        loss = loss.double() / (self.dp_size * loss_scale)
        return StepOutcome(loss=all_reduce_sum(loss, self.group), tokens=int(counted.item()))

    def eval_batch(self, micro: list[dict[str, torch.Tensor]]) -> StepOutcome:
        z_loss, self.loss_fn.z_loss = self.loss_fn.z_loss, 0.0
        self.loss_fn.factor = float(len(micro))  # the schedule's mean over micro-batches -> their sum
        try:
            with torch.no_grad():
                total, labels = self._run(micro, train=False)
        finally:
            self.loss_fn.z_loss = z_loss
        total = all_reduce_sum(total.double(), self.group)
        count = all_reduce_sum(token_mask(labels, None).sum().double(), self.group)
        return StepOutcome(loss=total / count.clamp(min=1), tokens=int(count.item()), weight=float(count.item()))
