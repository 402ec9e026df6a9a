"""The two normalisations the supported architectures use, computed the way their checkpoints expect.

RMSNorm normalises in fp32 and casts back before the gain (LLaMA/OLMo convention in transformers);
LayerNorm is torch's, with the bias switchable (GPT-NeoX ``use_bias_in_norms``).
"""

from __future__ import annotations

import torch
from torch import nn

from neoxt.config.schema import ModelConfig


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, reduced over the last dim only.

    ``shape`` (the gain's shape) may have several dims (GPT-NeoX ``use_qk_layernorm`` keeps one gain per head and
    dimension but reduces over ``head_dim`` only, as upstream's RMSNorm does).
    """

    def __init__(self, shape: int | tuple[int, ...], eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def make_norm(cfg: ModelConfig, shape: int | tuple[int, ...]) -> nn.Module:
    """The configured norm over ``shape`` (LayerNorm reduces over all of ``shape``, RMSNorm over its last dim)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(shape, cfg.rms_norm_epsilon)
    return nn.LayerNorm(shape, eps=cfg.layernorm_epsilon, bias=cfg.use_bias_in_norms)
