"""A preallocated key/value cache for incremental decoding.

Contract (``neoxt generate`` and evaluation rely on it):

- ``KVCache(cfg, batch_size, max_seq_len, device, dtype)`` allocates, for every layer, keys and
  values of shape ``[batch_size, cfg.num_kv_heads, max_seq_len, cfg.head_dim]`` once; decoding never
  reallocates.
- ``cache.seq_len`` is the number of positions already cached; it is the same for every row (batched
  generation aligns prompts by left padding and passes ``key_padding_mask``).
- ``Transformer.forward(tokens[B, T], kv_cache=cache)`` writes the T new keys/values of each layer at
  slots ``[seq_len, seq_len + T)``, attends over slots ``[0, seq_len + T)``, and advances
  ``seq_len`` by T exactly once, after the last layer. Positions default to
  ``seq_len + arange(T)``.
- Writing past ``max_seq_len`` raises ``ValueError``; ``reset()`` makes the cache empty again so it
  can be reused for the next batch of the same size.

Mamba layers (``attention_types`` ``mamba``/``mamba2``) keep no keys: ``ssm_states[layer]`` holds
their conv tail and scan state (shapes: ``mamba.state_shapes``), which each forward reads and
overwrites in place, so the cache is only ever advanced, never rewound; ``reset()`` zeroes them.

Keys are stored after the rotary embedding (and after any Q/K norm), so a cached step is never
recomputed. Sliding-window layers keep the full history too: the window is applied by the attention
mask, which keeps one cache layout for every layer type.
"""

from __future__ import annotations

import torch

from neoxt.config.schema import MAMBA_TYPES, ModelConfig
from neoxt.model.mamba import state_shapes


class KVCache:
    """Per-layer key/value buffers plus the shared fill level ``seq_len``."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        ssm = {i: t for i, t in enumerate(cfg.attention_types) if t in MAMBA_TYPES}
        self.keys = [None if i in ssm else torch.zeros(shape, device=device, dtype=dtype) for i in range(cfg.num_layers)]
        self.values = [None if i in ssm else torch.zeros(shape, device=device, dtype=dtype)
                       for i in range(cfg.num_layers)]
        self.ssm_states = {
            i: (torch.zeros(conv, device=device, dtype=dtype), torch.zeros(scan, device=device, dtype=torch.float32))
            for i, kind in ssm.items() for conv, scan in [state_shapes(cfg, kind, batch_size)]
        }
        self.seq_len = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, kv_heads, T, head_dim]; return all cached k/v up to and including it."""
        end = self.seq_len + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_seq_len {self.max_seq_len}")
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache holds batch {self.batch_size}, got a batch of {k.shape[0]}")
        self.keys[layer][:, :, self.seq_len : end] = k
        self.values[layer][:, :, self.seq_len : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        """Mark ``steps`` more positions as cached (called once per forward, after all layers)."""
        self.seq_len += steps

    def reset(self) -> None:
        self.seq_len = 0
        for conv, scan in self.ssm_states.values():
            conv.zero_()
            scan.zero_()
