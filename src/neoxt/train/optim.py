"""Optimizers GPT-NeoX configs name, built from torch.optim.

GPT-NeoX's ``Adam`` is apex/DeepSpeed FusedAdam with ``adam_w_mode=True``: decoupled weight decay,
i.e. ``torch.optim.AdamW``. Parameter groups follow upstream's
``get_params_for_weight_decay_optimization``: norm weights and every bias get no weight decay; with
``weight_decay == 0`` there is one group.
"""

from __future__ import annotations

import torch
from torch import nn

from neoxt.config.schema import OptimizerConfig
from neoxt.errors import ConfigError

# Mamba's state-space parameters, which upstream (and state-spaces) keep out of weight decay.
_SSM_NO_DECAY = frozenset({"A_log", "D", "dt_bias"})


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm) or name.endswith(("Norm", "LayerNorm"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decay, no_decay] groups (each named), or one no-decay group when weight_decay is 0."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        norm = _is_norm(module)
        for name, param in module.named_parameters(recurse=False):
            if param is None or not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))  # tied weights appear under two modules
            if weight_decay == 0.0 or norm or name == "bias" or name in _SSM_NO_DECAY \
                    or getattr(param, "_no_weight_decay", False):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "weight_decay_params"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_weight_decay_params"})
    return groups


def _fused_ok(model: nn.Module) -> bool:
    """torch's fused Adam/AdamW kernels handle CPU and CUDA float params, DTensors (FSDP2, TP, EP
    shards) included: one kernel per step instead of foreach's several passes and their temporaries."""
    for p in model.parameters():
        if p.device.type not in ("cpu", "cuda"):
            return False
        if not p.dtype.is_floating_point:
            return False
    return True


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kind = cfg.optimizer_type.lower()
    if kind in ("adam", "adamw"):
        fused = _fused_ok(model)
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None, foreach=None if fused else True
        )
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    if kind == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps, foreach=True)
    if kind == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, eps=cfg.eps, momentum=cfg.momentum, foreach=True)
    raise ConfigError(
        f"optimizer.type: '{cfg.optimizer_type}' is not available (torch ships adam/adamw, sgd, adagrad, rmsprop)"
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
