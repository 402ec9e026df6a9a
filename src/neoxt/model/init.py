"""GPT-NeoX weight initialisation for training from scratch.

Formulas follow upstream ``megatron/model/init_functions.py`` (H = hidden_size, L = num_layers,
sigma = init_method_std):

- ``normal``: N(0, sigma)
- ``scaled_normal``: N(0, sigma / sqrt(2 L))  (two residual branches per layer)
- ``single_residual_scaled_normal``: N(0, sigma / sqrt(L))  (Mamba: one residual branch per layer)
- ``small_init``: N(0, sqrt(2 / (5 H)))  (Nguyen & Salazar 2019)
- ``wang_init``: N(0, 2 / (L sqrt(H)))
- ``xavier_uniform`` / ``xavier_normal``: torch's Glorot initialisers.

As upstream, ``init_method`` initialises the embeddings, the output head and every projection that
*reads* the residual stream (q, k, v, MLP up/gate); ``output_layer_init_method`` initialises the two
projections that *write* it (attention ``o``, MLP ``down``, MoE ``experts.down``, Mamba ``out_proj``).
Biases start at zero, norm gains at one. A Mamba mixer's own parameters (``A_log``, ``D``,
``dt_proj``/``dt_bias``, ``conv1d``) get state-spaces' initialisation (``init_ssm_``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from neoxt.config.schema import ModelConfig
from neoxt.errors import ConfigError

InitFn = Callable[[torch.Tensor], None]

INIT_METHODS = ("normal", "scaled_normal", "single_residual_scaled_normal", "small_init", "wang_init", "xavier_uniform", "xavier_normal")


def init_fn(name: str, cfg: ModelConfig, generator: torch.Generator | None = None) -> InitFn:
    """The in-place initialiser GPT-NeoX calls ``name`` (see module docstring for the formulas)."""
    H, L = cfg.hidden_size, cfg.num_layers
    stds = {
        "normal": cfg.init_method_std,
        "scaled_normal": cfg.init_method_std / math.sqrt(2 * L),
        "single_residual_scaled_normal": cfg.init_method_std / math.sqrt(L),
        "small_init": math.sqrt(2 / (5 * H)),
        "wang_init": 2 / L / math.sqrt(H),
    }
    if name in stds:
        std = stds[name]
        return lambda t: nn.init.normal_(t, mean=0.0, std=std, generator=generator)
    if name in ("xavier_uniform", "xavier_normal"):
        return lambda t: _xavier(t, name == "xavier_uniform", generator)
    raise ConfigError(f"unknown init method {name!r} (init_method / output_layer_init_method); "
                      f"supported: {', '.join(INIT_METHODS)}")


def _xavier(t: torch.Tensor, uniform: bool, generator: torch.Generator | None) -> None:
    """Glorot init; stacked MoE experts [E, out, in] use one expert's fans (torch's would count E)."""
    fan_out, fan_in = t.shape[-2], t.shape[-1]
    std = math.sqrt(2.0 / (fan_in + fan_out))
    if uniform:
        bound = math.sqrt(3.0) * std
        nn.init.uniform_(t, -bound, bound, generator=generator)
    else:
        nn.init.normal_(t, 0.0, std, generator=generator)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    """(Re)initialise every parameter of a ``Transformer`` in place, GPT-NeoX style."""
    base = init_fn(cfg.init_method, cfg, generator)
    out = init_fn(cfg.output_layer_init_method, cfg, generator)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if leaf[-2] in ("mixer", "dt_proj", "conv1d"):
            continue  # Mamba's own parameters: init_ssm_ below
        if name.endswith(".bias"):
            nn.init.zeros_(param)
        elif "norm" in leaf[-2]:
            nn.init.ones_(param)
        elif leaf[-2] in ("o", "down", "out_proj") or leaf[-1] == "down":  # ``mlp.experts.down`` (MoE)
            out(param)
        else:
            base(param)
    for module in model.modules():
        if hasattr(module, "init_ssm_"):
            module.init_ssm_(generator)
