"""The one map between dtype names in configs and flags (``fp32``/``bf16``/``fp16``, or torch's own
``float32``/``bfloat16``/``float16``) and torch dtypes. torch is imported only when a dtype is
needed, so command-line parsers can list ``PRECISIONS`` cheaply."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The names configs and command-line flags use (GPT-NeoX's precision names), in display order.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ALIASES = {v: k for k, v in _TORCH_NAMES.items()}


def dtype_of(name: str) -> torch.dtype:
    """``"bf16"`` or ``"bfloat16"`` → ``torch.bfloat16``; a ValueError lists the names accepted."""
    import torch

    key = _ALIASES.get(name, name)
    if key not in _TORCH_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted([*_TORCH_NAMES, *_ALIASES])}")
    return getattr(torch, _TORCH_NAMES[key])


def precision_of(dtype: torch.dtype, default: str = "fp32") -> str:
    """``torch.bfloat16`` → ``"bf16"`` (``default`` for dtypes without a precision name)."""
    name = str(dtype).removeprefix("torch.")
    return _ALIASES.get(name, default)
