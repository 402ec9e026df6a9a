"""The two normalisations the supported architectures use, computed the way their checkpoints expect.

RMSNorm normalises in fp32. LLaMA (and GPT-NeoX) cast back to the input dtype *before* the gain;
OLMo-2/3 multiply the gain in fp32 and cast after. In bf16 the two round differently, so the OLMo-3
placement (``norm_placement: olmo3``) selects the OLMo order and everything else the LLaMA order:
that keeps our bf16 logits bit-identical to transformers' for every supported architecture.
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

    def __init__(self, shape: int | tuple[int, ...], eps: float, gain_in_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps
        self.gain_in_fp32 = gain_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gain_in_fp32:
            return (self.weight * x).to(dtype)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def make_norm(cfg: ModelConfig, shape: int | tuple[int, ...]) -> nn.Module:
    """The configured norm over ``shape`` (LayerNorm reduces over all of ``shape``, RMSNorm over its last dim)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(shape, cfg.rms_norm_epsilon, gain_in_fp32=cfg.norm_placement == "olmo3")
    return nn.LayerNorm(shape, eps=cfg.layernorm_epsilon, bias=cfg.use_bias_in_norms)
