"""The one table of our parameter names and shapes: read off the model itself, built on the meta
device (no memory, no initialisation), so converters and loaders can never disagree with it."""

from __future__ import annotations

import functools

import torch

from neoxt.config.schema import ModelConfig
from neoxt.errors import ConfigError


@functools.lru_cache(maxsize=8)
def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``Transformer(cfg).state_dict()`` names → shapes (tuples, so messages print plainly)."""
    from neoxt.model.transformer import Transformer

    if cfg.padded_vocab_size is None:
        raise ConfigError("padded_vocab_size is unknown (read it from the embedding first)")
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
