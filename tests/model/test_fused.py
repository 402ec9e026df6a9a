"""q/k/v (and gate/up) as one matmul: same outputs and gradients as separate layers; layers that
must keep their own forward (hooked, or not a plain nn.Linear) are not fused."""

from __future__ import annotations

import torch
from torch import nn

from neoxt.model.fused import fused_linears


def _layers(bias: bool) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(16, n, bias=bias) for n in (16, 8, 8)]


def test_fused_equals_separate_in_value_and_gradient():
    for bias in (False, True):
        layers = _layers(bias)
        x = torch.randn(2, 5, 16, requires_grad=True)
        fused = fused_linears(x, *layers)
        sum(o.square().sum() for o in fused).backward()
        grads = [p.grad.clone() for layer in layers for p in layer.parameters()] + [x.grad.clone()]
        for layer in layers:
            layer.zero_grad()
        x.grad = None
        separate = [layer(x) for layer in layers]
        sum(o.square().sum() for o in separate).backward()
        ref = [p.grad for layer in layers for p in layer.parameters()] + [x.grad]
        for a, b in zip(fused, separate, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hooked_layer_keeps_its_own_forward():
    layers = _layers(False)
    calls = []
    layers[1].register_forward_hook(lambda module, args, out: calls.append(1))
    fused_linears(torch.randn(1, 16), *layers)
    assert calls == [1]
