"""Several linear layers that read the same input, run as one matmul.

q/k/v (and the gated MLP's gate/up) each read the same activations; on CPU and GPU alike one GEMM
over the concatenated weights runs better than three small ones (one pass over the input, a wider
output for the BLAS kernel, one autograd node instead of three). The parameters stay separate
(``attn.q.weight``, ... are a contract with the converters and checkpoints); only the forward
concatenates them, which costs a copy of the weights, small beside the activations' matmul.

Fusion applies only to plain ``nn.Linear`` layers holding plain tensors and no hooks: tensor-parallel
(DTensor) weights, torchao's ``Float8Linear`` and hooked modules keep their own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fusable(layer: nn.Module) -> bool:
    return (type(layer) is nn.Linear and type(layer.weight) in (nn.Parameter, torch.Tensor)
            and not layer._forward_hooks and not layer._forward_pre_hooks)


def fused_linears(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """``tuple(layer(x) for layer in layers)``, as one matmul when every layer is fusable."""
    if not all(_fusable(layer) for layer in layers):
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)
