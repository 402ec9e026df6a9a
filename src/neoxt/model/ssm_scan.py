"""State-space scans for the Mamba mixers: a sequential reference and a chunked pure-torch scan.

Both Mamba versions run the linear recurrence, per channel, over time t:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t          y_t = <C_t, h_t> + D * x_t

- **Mamba-1** (selective scan, S6): ``x, dt`` are ``[b, l, d]``, ``A`` is ``[d, n]`` (a decay per
  channel *and* state), ``B, C`` are ``[b, l, n]``; the state is ``[b, d, n]``.
- **Mamba-2** (SSD): ``x`` is ``[b, l, heads, p]``, ``dt`` is ``[b, l, heads]``, ``A`` is ``[heads]``
  (one scalar decay per head), ``B, C`` are ``[b, l, groups, n]`` shared by ``heads / groups`` heads;
  the state is ``[b, heads, p, n]``.

``dt`` arrives already discretised (bias added, softplus, clamped): the mixers do that, so the scans
here are the recurrence alone. Every function takes an optional initial state and returns
``(y, final_state)``, which is what generation with a recurrent cache needs.

Why chunked: the sequential loop is one Python step per token. The chunked scans split time into
chunks of ``chunk_size``. Mamba-1 (a decay per channel and state, so no cheap quadratic form) advances
all chunks together one position at a time, then carries the state across chunks: ~2 sqrt(length)
steps, each on a slab of every chunk, and only ever multiplies decays ≤ 1, so it is stable. Mamba-2
computes each chunk at once with the SSD quadratic form (a segment-sum decay matrix) and carries the
state across chunks in a short loop. They equal the sequential recurrence to rounding, forward and backward
(autograd runs through plain torch ops). Arithmetic is fp32 (fp64 for fp64 inputs); ``y`` is returned
in ``x``'s dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.dtype:
    """The dtype the scans compute in: fp32, or fp64 when given fp64 (for exactness checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunks(t: torch.Tensor, chunk: int, fill: float) -> torch.Tensor:
    """[b, l, ...] → [b, l / chunk, chunk, ...], padding time with ``fill`` to a multiple of chunk."""
    pad = (-t.shape[1]) % chunk
    if pad:
        widths = [0, 0] * (t.dim() - 2) + [0, pad]
        t = F.pad(t, widths, value=fill)
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def _carry(decay: torch.Tensor, local: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """State entering each chunk and the final state: H_c = decay_c * H_{c-1} + local_c over chunks."""
    starts, h = [], h0
    for c in range(local.shape[1]):
        starts.append(h)
        h = decay[:, c] * h + local[:, c]
    return torch.stack(starts, dim=1), h


# ---------------------------------------------------------------------------------------------
# Mamba-1


def selective_scan_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-1 recurrence one step at a time (the reference the chunked scan is checked against)."""
    b, length, d = x.shape
    w = _wide(x)
    xf, dtf, Af, Bf, Cf = x.to(w), dt.to(w), A.to(w), B.to(w), C.to(w)
    h = torch.zeros(b, d, A.shape[-1], device=x.device, dtype=w) if h0 is None else h0.to(w)
    ys = []
    for t in range(length):
        h = torch.exp(dtf[:, t, :, None] * Af) * h + (dtf[:, t] * xf[:, t])[..., None] * Bf[:, t, None, :]
        ys.append((h * Cf[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, d)
    if D is not None:
        y = y + xf * D.to(w)
    return y.to(x.dtype), h


def selective_scan_chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, h0: torch.Tensor | None = None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-1 recurrence, chunk-parallel (same contract as ``selective_scan_sequential``).

    Time is cut into chunks of ``chunk_size`` (default ~sqrt(length)). One loop over the positions
    of a chunk advances every chunk at once from a zero state and reads out each position's output;
    one loop over chunks carries the true state across chunk boundaries; one vectorised step adds
    what that carried state, decayed, contributes to each output. About ``2 sqrt(length)`` Python
    steps instead of ``length``, each on a slab of all chunks, with the work of the recurrence plus
    one more exp and read-out per element.
    """
    b, length, d = x.shape
    w = _wide(x)
    chunk = max(1, min(chunk_size or math.ceil(math.sqrt(length)), length))

    def slabs(t: torch.Tensor) -> torch.Tensor:  # [b, l, ...] -> [b, q, c, ...]: position in chunk first
        return _chunks(t.to(w), chunk, 0.0).transpose(1, 2)

    dts, dtxs, Bs, Cs = slabs(dt), slabs(dt.to(w) * x.to(w)), slabs(B), slabs(C)
    Aw = A.to(w)
    local = torch.zeros(b, dts.shape[2], d, A.shape[-1], device=x.device, dtype=w)
    outs = []
    for t in range(chunk):
        local = torch.exp(dts[:, t, :, :, None] * Aw) * local + dtxs[:, t, :, :, None] * Bs[:, t, :, None, :]
        outs.append((local * Cs[:, t, :, None, :]).sum(-1))
    # A is constant in time, so the decay from a chunk's start to position t is exp(A * sum of dt):
    # at most 1 (A < 0, dt >= 0), computed directly rather than carried through the loop.
    decay = torch.exp(torch.cumsum(dts, dim=1)[..., None] * Aw)  # [b, q, c, d, n]
    start = torch.zeros(b, d, A.shape[-1], device=x.device, dtype=w) if h0 is None else h0.to(w)
    starts, h = _carry(decay[:, -1], local, start)  # [b, c, d, n] entering each chunk; the final state
    y = torch.stack(outs, dim=1) + torch.einsum("bqcdn,bcdn,bqcn->bqcd", decay, starts, Cs)
    y = y.transpose(1, 2).reshape(b, -1, d)[:, :length]
    if D is not None:
        y = y + x.to(w) * D.to(w)
    return y.to(x.dtype), h


# ---------------------------------------------------------------------------------------------
# Mamba-2 (SSD)


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, l, groups, n] → [b, l, heads, n] (each group serves heads / groups consecutive heads)."""
    return t.to(_wide(t)).repeat_interleave(heads // t.shape[2], dim=2)


def ssd_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-2 recurrence one step at a time."""
    b, length, heads, p = x.shape
    w = _wide(x)
    xf, dtf = x.to(w), dt.to(w)
    Bh, Ch = _per_head(B, heads), _per_head(C, heads)
    h = torch.zeros(b, heads, p, B.shape[-1], device=x.device, dtype=w) if h0 is None else h0.to(w)
    ys = []
    for t in range(length):
        decay = torch.exp(dtf[:, t] * A.to(w))[..., None, None]
        h = decay * h + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, heads, p)
    if D is not None:
        y = y + xf * D.to(w)[:, None]
    return y.to(x.dtype), h


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """a [..., q] → S [..., q, q] with S[t, s] = a[s+1] + ... + a[t] for s <= t, -inf above the diagonal.

    Summed directly (masked cumulative sums), not as a difference of prefix sums, so long chunks do
    not lose precision to cancellation.
    """
    q = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, q)  # rep[..., r, s] = a[r]
    strict = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(rep.masked_fill(~strict, 0.0), dim=-2)
    keep = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~keep, float("-inf"))


def ssd_chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, h0: torch.Tensor | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-2 recurrence in SSD chunked form (same contract as ``ssd_sequential``)."""
    b, length, heads, p = x.shape
    w = _wide(x)
    chunk = max(1, min(chunk_size, length))
    xf, dtf = x.to(w), dt.to(w)
    xdt = _chunks(xf * dtf[..., None], chunk, 0.0)  # [b, c, q, h, p]
    Bc = _chunks(_per_head(B, heads), chunk, 0.0)  # [b, c, q, h, n]
    Cc = _chunks(_per_head(C, heads), chunk, 0.0)
    a = _chunks(dtf * A.to(w), chunk, 0.0).permute(0, 1, 3, 2)  # [b, c, h, q]
    cum = torch.cumsum(a, dim=-1)
    # Inside each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(a_{s+1} + ... + a_t) dt_s x_s.
    weights = torch.einsum("bcthn,bcshn->bchts", Cc, Bc) * torch.exp(_segment_sum(a))
    y = torch.einsum("bchts,bcshp->bcthp", weights, xdt)
    # Each chunk's own contribution to the state at its end, then the carry across chunks.
    to_end = torch.exp(cum[..., -1:] - cum)  # [b, c, h, q]
    local = torch.einsum("bchs,bcshn,bcshp->bchpn", to_end, Bc, xdt)
    start = torch.zeros(b, heads, p, B.shape[-1], device=x.device, dtype=w) if h0 is None else h0.to(w)
    starts, h = _carry(torch.exp(cum[..., -1])[..., None, None], local, start)
    # What the state entering a chunk adds at each position of it.
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cc, starts) * torch.exp(cum).permute(0, 1, 3, 2)[..., None]
    y = y.reshape(b, -1, heads, p)[:, :length]
    if D is not None:
        y = y + xf * D.to(w)[:, None]
    return y.to(x.dtype), h
