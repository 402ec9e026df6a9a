"""float8 training through torchao (``float8_recipe: tensorwise | rowwise``), as torchtitan does it.

Each transformer block's linear layers become torchao ``Float8Linear`` (``convert_to_float8_training``):
inputs, weights and output gradients are cast to float8 with dynamic scales (one per tensor, or one
per row for ``rowwise``) and multiplied by float8 GEMMs; the weights stay in their own dtype, so
parameter names, optimizer state and checkpoints do not change. The output head and embeddings keep
their precision (torchtitan's default filter), as does any linear whose dimensions are not multiples
of 16 (a float8 GEMM requirement). With FSDP2 and ``tensorwise`` the all-gather itself moves float8
weights (``enable_fsdp_float8_all_gather``). Compile composes (it fuses the casts).

Only CUDA GPUs with compute capability 8.9 or newer (Ada, Hopper, Blackwell) have float8 GEMMs;
anywhere else ``check_float8`` refuses the config in one line before anything is built. torchao's
emulation mode (``emulate=True``: the same casts and scales, the GEMM done in high precision) is what
the CPU tests run, so the conversion path itself is exercised without such a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from neoxt.config.schema import RunConfig
from neoxt.errors import ConfigError

RECIPES = ("tensorwise", "rowwise")


def check_float8(cfg: RunConfig, device: torch.device) -> None:
    """Refuse ``float8_recipe`` where it cannot run (one line, naming the key and what is missing)."""
    recipe = cfg.training.float8_recipe
    if recipe is None:
        return
    if recipe not in RECIPES:
        raise ConfigError(f"float8_recipe must be one of {list(RECIPES)}, got {recipe!r}")
    if cfg.parallelism.model_parallel_size > 1:
        raise ConfigError(f"float8_recipe: {recipe} with model_parallel_size > 1 is not supported yet "
                          "(tensor parallel needs torchao's float8 TP styles); use FSDP alone")
    if device.type != "cuda":
        raise ConfigError(f"float8_recipe: {recipe} needs a CUDA GPU with compute capability 8.9+ (H100/H200, "
                          f"L4/L40, RTX 40xx); this run is on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ConfigError(f"float8_recipe: {recipe} needs compute capability 8.9+ (H100/H200, L4/L40); "
                          f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"float8_recipe: {recipe} needs torchao (pip install 'neoxt[float8]'): {err}") from err


def _float8_linear(module: nn.Module, fqn: str) -> bool:
    """Which linears to convert: those inside the blocks, with float8-GEMM-compatible shapes."""
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(model: nn.Module, recipe: str, fsdp_all_gather: bool = False, emulate: bool = False) -> int:
    """Swap the blocks' linears for torchao ``Float8Linear`` in place; returns how many were swapped.

    ``fsdp_all_gather``: all-gather float8 weights under FSDP2 (``tensorwise`` only, as in torchao).
    ``emulate``: torchao's high-precision emulation of the float8 GEMMs (CPU tests)."""
    from dataclasses import replace

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    if recipe not in RECIPES:
        raise ConfigError(f"float8_recipe must be one of {list(RECIPES)}, got {recipe!r}")
    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_all_gather, emulate=emulate)
    else:
        config = replace(Float8LinearConfig.from_recipe_name("rowwise"), emulate=emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=_float8_linear)
    return sum(isinstance(m, Float8Linear) for m in model.modules())
