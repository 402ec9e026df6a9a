"""The neoxt model: one ``Transformer`` covering GPT-NeoX, LLaMA, OLMo-3 and Mamba / hybrid stacks (see ``transformer.py``)."""

from neoxt.model.flops import flops_per_token, num_params
from neoxt.model.init import init_weights
from neoxt.model.kv_cache import KVCache
from neoxt.model.presets import preset
from neoxt.model.transformer import Transformer

__all__ = ["KVCache", "Transformer", "flops_per_token", "init_weights", "num_params", "preset"]
