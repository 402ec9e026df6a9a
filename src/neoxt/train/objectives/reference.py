"""The frozen reference model DPO and KTO compare the policy against."""

from __future__ import annotations

import copy

from torch import nn

from neoxt.errors import ConfigError
from neoxt.train.objectives.base import ObjectiveContext


def frozen_reference(ctx: ObjectiveContext, needed: bool) -> nn.Module | None:
    """A frozen copy of the starting model, parallelized like the policy (None when not ``needed``).

    Taken before the policy is parallelized (FSDP modules cannot be deep-copied). The reference is
    the model the run started from: the weights of ``load`` (the usual ``finetune: true`` + ``load:
    <SFT model>``), which a resumed run loads again, so resuming stays exact and checkpoints need not
    carry a second copy of the weights. Without ``load`` a fresh run takes the starting weights; a
    resumed run could not recover them, which is an error rather than a silently different objective.
    """
    if not needed:
        return None
    impl = ctx.cfg.training.train_impl
    reference = copy.deepcopy(ctx.model)
    if ctx.load_weights is not None:
        ctx.load_weights(reference)
    elif not ctx.fresh_start:
        raise ConfigError(
            f"train_impl: {impl} resumed without 'load': the reference model (the starting weights) cannot be "
            "recovered; set load to the model DPO started from, or use dpo_reference_free / precompute_model_name"
        )
    for p in reference.parameters():
        p.requires_grad_(False)
    reference = ctx.parallelize(reference)
    reference.eval()
    return reference
