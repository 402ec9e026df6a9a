"""Mamba blocks: the state-space layers of pure Mamba and hybrid attention/Mamba stacks.

A layer whose ``attention_types`` entry is ``"mamba"`` (Mamba-1, selective scan) or ``"mamba2"``
(Mamba-2, SSD) is a ``MambaBlock``: ``x + mixer(norm(x))``, no MLP, as GPT-NeoX's
``ParallelMambaResidualLayer``, state-spaces' ``Block`` and HF's ``MambaBlock`` all build it.

Mamba-1 mixer (``Mamba1Mixer``)::

    x, z = in_proj(h).chunk(2)                  # [b, l, d_inner] each
    x = silu(causal depthwise conv1d(x))        # kernel mamba_d_conv
    dt, B, C = x_proj(x).split(rank, n, n)
    dt = softplus(dt_proj(dt))                  # [b, l, d_inner]
    y = scan(x, dt, A = -exp(A_log), B, C) + D * x
    out = out_proj(y * silu(z))

Mamba-2 mixer (``Mamba2Mixer``): ``in_proj`` gives ``z, xBC, dt`` at once; the conv runs over
``xBC``; ``A`` is one scalar per head; ``dt = clamp(softplus(dt + dt_bias))``; the output is a gated,
group-wise RMSNorm ``norm(y * silu(z))`` before ``out_proj``.

Parameter names and shapes are HF's (``mixer.in_proj``, ``mixer.conv1d``, ``mixer.x_proj``,
``mixer.dt_proj``, ``mixer.A_log``, ``mixer.D``, ``mixer.dt_bias``, ``mixer.norm``,
``mixer.out_proj``), so conversion is a rename. ``A_log`` and ``D`` are applied in fp32.

Scans: on CPU (or when a recurrent state is carried) the chunked pure-torch scans of
``ssm_scan.py``; on CUDA the ``mamba_ssm`` / ``causal_conv1d`` kernels when they are installed.

Generation: ``KVCache`` holds, for each Mamba layer, the last ``d_conv - 1`` conv inputs and the scan
state; a forward with a cache starts from them and writes them back, so a prompt can be fed whole and
then one token at a time. Padding (left-padded batches) is zeroed before the conv and the scan, which
keeps the state of a padded row exactly that of its unpadded prompt when ``in_proj`` has no bias.
Document boundaries (``attn_mask``) are not seen by Mamba layers, as in GPT-NeoX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neoxt.config.schema import ModelConfig
from neoxt.model.norms import make_norm
from neoxt.model.ssm_scan import selective_scan_chunked, ssd_chunked

# ``mask_for`` key under which Transformer.forward hands a Mamba block the padding of its new tokens.
PADDING = "padding"

try:  # CUDA kernels, optional
    from causal_conv1d import causal_conv1d_fn as _cuda_conv
except ImportError:
    _cuda_conv = None
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan
except ImportError:
    _cuda_scan = None
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _cuda_ssd
except ImportError:
    _cuda_ssd = None


def state_shapes(cfg: ModelConfig, kind: str, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's recurrent cache: (conv tail, scan state)."""
    conv, inner, n = cfg.mamba_d_conv - 1, cfg.mamba_inner, cfg.mamba_d_state
    if kind == "mamba":
        return (batch, inner, conv), (batch, inner, n)
    return (batch, _conv_width(cfg), conv), (batch, inner // cfg.mamba_headdim, cfg.mamba_headdim, n)


def _conv_width(cfg: ModelConfig) -> int:
    return cfg.mamba_inner + 2 * cfg.mamba_ngroups * cfg.mamba_d_state


def _conv(x: torch.Tensor, conv: nn.Conv1d, tail: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv) over x [b, l, c]; with a cache, ``tail`` holds the previous inputs
    [b, c, k-1] and is overwritten with the last k-1 of (tail + x)."""
    xt = x.transpose(1, 2)
    if tail is None and _cuda_conv is not None and x.is_cuda:
        out = _cuda_conv(xt.contiguous(), conv.weight.squeeze(1), conv.bias, activation="silu")
        return out.transpose(1, 2)
    k = conv.weight.shape[-1]
    past = tail.to(xt.dtype) if tail is not None else xt.new_zeros(xt.shape[0], xt.shape[1], k - 1)
    full = torch.cat([past, xt], dim=-1)
    if tail is not None:
        tail.copy_(full[..., full.shape[-1] - (k - 1):])
    out = F.conv1d(full, conv.weight, conv.bias, groups=xt.shape[1])
    return F.silu(out).transpose(1, 2)


def _mask(x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    return x if pad is None else x * pad[..., None].to(x.dtype)


def _conv_init(conv: nn.Conv1d, generator: torch.Generator | None) -> None:
    """torch's default Conv1d init (what state-spaces keeps), drawn from ``generator``."""
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
    if conv.bias is not None:
        bound = 1 / math.sqrt(conv.weight.shape[1] * conv.weight.shape[2])
        nn.init.uniform_(conv.bias, -bound, bound, generator=generator)


def _dt_init(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """state-spaces' dt bias init: softplus^-1 of dt ~ log-uniform in [0.001, 0.1] (floor 1e-4)."""
    lo, hi = math.log(1e-3), math.log(1e-1)
    dt = torch.exp(torch.rand(size, generator=generator) * (hi - lo) + lo).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba1Mixer(nn.Module):
    """Mamba-1: selective scan with an input-dependent dt, B and C per token (see module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, inner, n, rank = cfg.hidden_size, cfg.mamba_inner, cfg.mamba_d_state, cfg.mamba_rank
        bias = cfg.mamba_use_bias_in_linears
        self.n, self.rank = n, rank
        self.in_proj = nn.Linear(H, 2 * inner, bias=bias)
        self.conv1d = nn.Conv1d(inner, inner, cfg.mamba_d_conv, groups=inner, padding=cfg.mamba_d_conv - 1,
                                bias=cfg.mamba_use_bias_in_conv)
        self.x_proj = nn.Linear(inner, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, H, bias=bias)

    @torch.no_grad()
    def init_ssm_(self, generator: torch.Generator | None = None) -> None:
        """S4D-real A, D = 1, dt_proj as state-spaces (the rest follows init_method)."""
        inner = self.D.shape[0]
        a = torch.arange(1, self.n + 1, dtype=torch.float32).expand(inner, -1)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        std = self.rank ** -0.5
        self.dt_proj.weight.copy_(torch.rand(self.dt_proj.weight.shape, generator=generator) * 2 * std - std)
        self.dt_proj.bias.copy_(_dt_init(inner, generator))
        _conv_init(self.conv1d, generator)

    def forward(self, h: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None,
                pad: torch.Tensor | None) -> torch.Tensor:
        x, z = self.in_proj(_mask(h, pad)).chunk(2, dim=-1)
        x = _mask(_conv(x, self.conv1d, state[0] if state else None), pad)
        dt, B, C = self.x_proj(x).split([self.rank, self.n, self.n], dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())
        A = -torch.exp(self.A_log.float())
        if state is None and _cuda_scan is not None and x.is_cuda:
            y = _cuda_scan(x.transpose(1, 2).contiguous(), dt.to(x.dtype).transpose(1, 2).contiguous(), A,
                           B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float())
            y = y.transpose(1, 2)
        else:
            y, last = selective_scan_chunked(x, dt, A, B, C, self.D, state[1] if state else None)
            if state is not None:
                state[1].copy_(last)
        return self.out_proj((y * F.silu(z.float())).to(h.dtype))


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm of ``x * silu(gate)`` over groups of ``group_size`` channels."""

    def __init__(self, width: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(gate.float())
        g = x.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 (SSD): scalar decay per head, B and C shared by groups of heads (see module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, inner, n = cfg.hidden_size, cfg.mamba_inner, cfg.mamba_d_state
        self.inner, self.n, self.groups = inner, n, cfg.mamba_ngroups
        self.headdim, self.heads = cfg.mamba_headdim, inner // cfg.mamba_headdim
        self.chunk, self.dt_limit = cfg.mamba_chunk_size, tuple(cfg.mamba_dt_limit)
        conv = self.conv_width = _conv_width(cfg)
        bias = cfg.mamba_use_bias_in_linears
        self.in_proj = nn.Linear(H, inner + conv + self.heads, bias=bias)
        self.conv1d = nn.Conv1d(conv, conv, cfg.mamba_d_conv, groups=conv, padding=cfg.mamba_d_conv - 1,
                                bias=cfg.mamba_use_bias_in_conv)
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm = GatedRMSNorm(inner, inner // self.groups, cfg.norm_eps)
        self.out_proj = nn.Linear(inner, H, bias=bias)

    @torch.no_grad()
    def init_ssm_(self, generator: torch.Generator | None = None) -> None:
        """A = 1..heads, D = 1, dt_bias as state-spaces (the rest follows init_method)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(_dt_init(self.heads, generator))
        _conv_init(self.conv1d, generator)

    def forward(self, h: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None,
                pad: torch.Tensor | None) -> torch.Tensor:
        b, length, _ = h.shape
        z, xbc, dt = self.in_proj(_mask(h, pad)).split([self.inner, self.conv_width, self.heads], dim=-1)
        xbc = _mask(_conv(xbc, self.conv1d, state[0] if state else None), pad)
        x, B, C = xbc.split([self.inner, self.groups * self.n, self.groups * self.n], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
        A = -torch.exp(self.A_log.float())
        x = x.reshape(b, length, self.heads, self.headdim)
        B, C = B.reshape(b, length, self.groups, self.n), C.reshape(b, length, self.groups, self.n)
        if state is None and _cuda_ssd is not None and x.is_cuda:
            y = _cuda_ssd(x, dt, A, B, C, self.chunk, D=self.D.float())
        else:
            y, last = ssd_chunked(x, dt, A, B, C, self.D, state[1] if state else None, self.chunk)
            if state is not None:
                state[1].copy_(last)
        return self.out_proj(self.norm(y.reshape(b, length, self.inner), z))


class MambaBlock(nn.Module):
    """``x + mixer(norm(x))``; called like an attention ``Block`` (rotary tables unused)."""

    mask_key = PADDING

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = cfg.attention_types[layer_idx]
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.mixer = Mamba1Mixer(cfg) if self.kind == "mamba" else Mamba2Mixer(cfg)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, cos, sin, mask_for, kv_cache, plain) -> torch.Tensor:
        pad = None if plain else mask_for(PADDING)
        state = kv_cache.ssm_states[self.layer_idx] if kv_cache is not None else None
        return x + self.drop(self.mixer(self.norm(x), state, pad))


def check_mamba_config(cfg: ModelConfig) -> None:
    """Fail early, naming the key, on Mamba settings the blocks cannot build."""
    from neoxt.errors import ConfigError

    if "mamba2" not in cfg.attention_types:
        return
    if cfg.mamba_inner % cfg.mamba_headdim:
        raise ConfigError(f"mamba_d_inner {cfg.mamba_inner} is not divisible by mamba_headdim {cfg.mamba_headdim}")
    heads = cfg.mamba_inner // cfg.mamba_headdim
    if cfg.mamba_inner % cfg.mamba_ngroups or heads % cfg.mamba_ngroups:
        raise ConfigError(f"mamba_ngroups {cfg.mamba_ngroups} must divide mamba_d_inner {cfg.mamba_inner} "
                          f"and its {heads} heads")
