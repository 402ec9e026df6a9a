"""The chunked scans equal the sequential recurrence (≤1e-5), forward and backward, on random
inputs: Mamba-1 (selective scan) and Mamba-2 (SSD), ragged chunks, initial states, several chunk sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neoxt.model.ssm_scan import (
    selective_scan_chunked,
    selective_scan_sequential,
    ssd_chunked,
    ssd_sequential,
)


def _mamba1_inputs(seed: int, b=2, length=37, d=6, n=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=g)
    dt = F.softplus(torch.randn(b, length, d, generator=g) - 1.0)
    A = -torch.exp(torch.randn(d, n, generator=g))
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D, h0 = torch.randn(d, generator=g), torch.randn(b, d, n, generator=g)
    return [x, dt, A, B, C, D, h0]


def _mamba2_inputs(seed: int, b=2, length=37, heads=4, p=3, groups=2, n=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, heads, p, generator=g)
    dt = F.softplus(torch.randn(b, length, heads, generator=g) - 1.0)
    A = -torch.exp(torch.randn(heads, generator=g))
    B, C = torch.randn(b, length, groups, n, generator=g), torch.randn(b, length, groups, n, generator=g)
    D, h0 = torch.randn(heads, generator=g), torch.randn(b, heads, p, n, generator=g)
    return [x, dt, A, B, C, D, h0]


CASES = {
    "mamba1": (_mamba1_inputs, selective_scan_sequential, selective_scan_chunked),
    "mamba2": (_mamba2_inputs, ssd_sequential, ssd_chunked),
}


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_scan_equals_sequential_forward_and_backward(kind, chunk, with_h0, dtype):
    """Outputs within 1e-5; gradients within 1e-5 (fp64; in fp32 relative to the gradient's size,
    since dA sums hundreds of terms and fp32 keeps ~7 significant digits)."""
    make, sequential, chunked = CASES[kind]
    inputs = [t.to(dtype) for t in make(seed=chunk)]
    if not with_h0:
        inputs[-1] = None
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    leaves2 = [t.clone().detach().requires_grad_(True) if t is not None else None for t in inputs]
    y_ref, h_ref = sequential(*leaves)
    y, h = chunked(*leaves2, chunk_size=chunk)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    assert (y - y_ref).abs().max().item() <= 1e-5
    assert (h - h_ref).abs().max().item() <= 1e-5
    # backward: a random cotangent on both outputs
    g = torch.Generator().manual_seed(7)
    wy, wh = torch.randn(y.shape, generator=g, dtype=dtype), torch.randn(h.shape, generator=g, dtype=dtype)
    ((y_ref * wy).sum() + (h_ref * wh).sum()).backward()
    ((y * wy).sum() + (h * wh).sum()).backward()
    for name, a, b in zip("x dt A B C D h0".split(), leaves, leaves2, strict=True):
        if a is None:
            continue
        scale = 1.0 if dtype == torch.float64 else max(1.0, a.grad.abs().max().item())
        assert (a.grad - b.grad).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("kind", CASES)
def test_chunked_scan_resumes_from_its_own_state(kind):
    """Scanning a sequence in two pieces (the second starting from the first's final state) equals one
    scan: what generation with a recurrent cache relies on."""
    make, _, chunked = CASES[kind]
    x, dt, A, B, C, D, _ = make(seed=3)
    y, h = chunked(x, dt, A, B, C, D, chunk_size=8)
    y1, h1 = chunked(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], D, chunk_size=8)
    y2, h2 = chunked(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], D, h0=h1, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(h2, h, atol=1e-5, rtol=0)
