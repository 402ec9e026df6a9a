"""The one decoder-only Transformer behind every neoxt model.

Read top to bottom, this file is the model's definition:

1. **Embedding.** ``embed`` maps token ids to ``hidden_size`` vectors (plus ``pos_embed`` rows when
   ``pos_emb: learned``); dropout ``hidden_dropout``.
2. **Blocks.** ``num_layers`` identical blocks, each an attention sublayer and an MLP sublayer joined
   to the residual stream in one of four ways (``norm_placement`` / ``gpt_j_residual``):

   - pre (GPT-NeoX sequential, LLaMA): ``x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x))``
   - parallel (GPT-NeoX ``gpt_j_residual``): ``x = mlp(mlp_norm(x)) + attn(attn_norm(x)) + x``
     (``gpt_j_tied``: one norm feeds both)
   - olmo3: ``x = x + attn_norm(attn(x)); x = x + mlp_norm(mlp(x))`` (norm on the sublayer output)
   - post (original Transformer): ``x = attn_norm(x + attn(x)); x = mlp_norm(x + mlp(x))``

   Attention (``attention.py``): separate q/k/v/o parameters (q/k/v run as one matmul: ``fused.py``), optional Q/K norms, rotary embeddings
   on the first ``rotary_dim`` dims of each head (optionally scaled for long context, on all layers
   or only the full-attention ones: ``rope.py``), causal SDPA with grouped-query heads, per-layer
   full or sliding-window masks. MLP: ``down(act(up(x)))``, or for gated activations
   ``down(act(gate(x)) * up(x))`` with ``intermediate_size`` the width of each branch; on the
   layers ``cfg.is_moe_layer(i)`` picks, a mixture of experts instead (``moe.py``).
3. **Final norm** ``final_norm``.
4. **Output head** ``lm_head`` (hidden → padded vocabulary), or the embedding matrix when tied; one
   scalar per position with ``value_head`` (a reward model).

Parameter names are a contract (converters and the GPT-NeoX importer map onto them):
``embed.weight``, ``pos_embed.weight``, ``layers.{i}.attn_norm.*``, ``layers.{i}.mlp_norm.*``,
``layers.{i}.attn.{q,k,v,o}.{weight,bias}``, ``layers.{i}.attn.{q_norm,k_norm,qk_norm}.*``,
``layers.{i}.mlp.{up,gate,down}.{weight,bias}``, ``final_norm.*``, ``lm_head.weight``; MoE layers
``layers.{i}.mlp.router.weight``, ``layers.{i}.mlp.experts.{gate,up,down}``, ``layers.{i}.mlp.shared.*``.

Layers whose ``attention_types`` entry is ``mamba`` / ``mamba2`` are state-space blocks instead
(``mamba.py``: ``x + mixer(norm(x))``, parameters ``layers.{i}.norm.*``, ``layers.{i}.mixer.*``);
pure Mamba and hybrid stacks are the same class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from neoxt.config.schema import MAMBA_TYPES, ModelConfig
from neoxt.errors import ConfigError
from neoxt.model.attention import Attention, build_mask, check_attention_config
from neoxt.model.fused import fused_linears
from neoxt.model.init import init_weights
from neoxt.model.kv_cache import KVCache
from neoxt.model.mamba import PADDING, MambaBlock, check_mamba_config
from neoxt.model.moe import MoE, check_moe_config, moe_aux_loss, moe_aux_losses
from neoxt.model.norms import make_norm
from neoxt.model.rope import check_rope_config, rope_tables

_ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GeLU, as GPT-NeoX and HF GPTNeoX "gelu"
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "reglu": F.relu,
}


class MLP(nn.Module):
    """Two-layer feed-forward; gated variants multiply act(gate(x)) into up(x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, width, bias = cfg.hidden_size, cfg.intermediate_size, cfg.use_bias_in_mlp
        self.up = nn.Linear(H, width, bias=bias)
        self.gate = nn.Linear(H, width, bias=bias) if cfg.gated else None
        self.down = nn.Linear(width, H, bias=bias)
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        gate, up = fused_linears(x, self.gate, self.up)
        return self.down(self.act(gate) * up)


def _moe(cfg: ModelConfig) -> MoE:
    shared = None
    if cfg.moe_num_shared_experts:
        width = cfg.moe_num_shared_experts * cfg.moe_width
        shared = MLP(replace(cfg, intermediate_size=width, use_bias_in_mlp=False))
    return MoE(cfg, _ACTIVATIONS[cfg.activation], shared)


class Block(nn.Module):
    """Attention + MLP joined to the residual stream as ``norm_placement`` / ``gpt_j_residual`` say."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.placement = cfg.norm_placement
        self.parallel = cfg.gpt_j_residual
        tied = cfg.gpt_j_residual and cfg.gpt_j_tied
        self.attn_norm = make_norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = None if tied else make_norm(cfg, cfg.hidden_size)
        self.mlp = _moe(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg)
        self.drop = nn.Dropout(cfg.hidden_dropout)

    @property
    def mask_key(self) -> int | None:
        """What this block asks ``mask_for`` for (its sliding window, None for full attention)."""
        return self.attn.window

    def forward(self, x, cos, sin, mask_for, kv_cache, plain) -> torch.Tensor:
        def attn(h: torch.Tensor) -> torch.Tensor:
            return self.drop(self.attn(h, cos, sin, mask_for(self.attn.window), kv_cache, plain))

        def mlp(h: torch.Tensor) -> torch.Tensor:
            return self.drop(self.mlp(h))

        if self.parallel:
            h = self.attn_norm(x)
            return mlp(h if self.mlp_norm is None else self.mlp_norm(x)) + attn(h) + x
        if self.placement == "olmo3":
            x = x + self.attn_norm(attn(x))
            return x + self.mlp_norm(mlp(x))
        if self.placement == "post":
            x = self.attn_norm(x + attn(x))
            return self.mlp_norm(x + mlp(x))
        x = x + attn(self.attn_norm(x))
        return x + mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Embedding → blocks → final norm → output head (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        V, H = cfg.padded_vocab_size, cfg.hidden_size
        self.embed = nn.Embedding(V, H)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, H) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(
            MambaBlock(cfg, i) if kind in MAMBA_TYPES else Block(cfg, i) for i, kind in enumerate(cfg.attention_types)
        )
        self.final_norm = make_norm(cfg, H)
        if cfg.value_head:  # a reward model: one scalar per position (never tied to the embedding)
            self.lm_head: nn.Linear | None = nn.Linear(H, 1, bias=False)
        else:
            self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(H, V, bias=False)
        self.context_parallel = None  # neoxt.distributed.context_parallel.SequenceSplit when cp > 1
        init_weights(self, cfg)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, padded_vocab] for tokens [B, T] (values [B, T, 1] with ``value_head``).

        positions [B, T]: rotary / learned positions (default: ``arange`` continuing after the cache).
        kv_cache: see ``kv_cache.py``; it is written and advanced by T.
        key_padding_mask [B, S] (True = real token) over every key slot, S = cached + T.
        attn_mask [B, 1, T, S] (True = may attend), ANDed with causality, e.g. document boundaries.
        head: replaces the output projection: ``head(final hidden [B, T, H], output weight [V, H])``
        is returned instead of logits, so a loss can project in chunks and never hold the full logits
        (``neoxt.train.chunked_loss``). It runs inside this forward so FSDP's unsharded weight is used.

        A pipeline stage (``neoxt.distributed.pipeline``) is this module with parts removed, as in
        torchtitan's pipelined models: without ``embed`` the input is hidden states [B, T, H], without
        ``final_norm`` the output is hidden states, and ``layers`` may hold only some blocks, keyed
        by their global index.
        """
        B, T = tokens.shape[:2]
        past = kv_cache.seq_len if kv_cache is not None else 0
        S = past + T
        if key_padding_mask is not None and key_padding_mask.shape != (B, S):
            raise ValueError(f"key_padding_mask must be [{B}, {S}] (batch, cached + new), got "
                             f"{list(key_padding_mask.shape)}")
        split, slots = self.context_parallel, None  # neoxt.distributed.context_parallel: 1/cp of the sequence
        if split is not None:
            if kv_cache is not None or key_padding_mask is not None or positions is None:
                raise ValueError("under context parallelism the forward takes the rank's share of a training "
                                 "sequence with its position ids, and no cache or padding mask")
            slots, S = split.slots(T, tokens.device), T * split.size  # the keys span the whole sequence
        if positions is None:
            positions = (torch.arange(T, device=tokens.device) + past)[None].expand(B, T)

        x = tokens
        if self.embed is not None:
            x = self.embed(tokens)
            if self.pos_embed is not None:
                x = x + self.pos_embed(positions)
            x = self.drop(x)

        rope = rope_tables(self.cfg, positions, x.dtype) if self.cfg.pos_emb == "rotary" else {}

        masks: dict[int | None, torch.Tensor | None] = {}

        def mask_for(window: int | str | None) -> torch.Tensor | None:
            if window == PADDING:  # Mamba blocks: which of the T new tokens are real
                return None if key_padding_mask is None else key_padding_mask[:, past:].to(torch.bool)
            if window not in masks:
                masks[window] = build_mask(T, S, window, key_padding_mask, attn_mask, tokens.device, slots)
            return masks[window]

        plain = key_padding_mask is None and attn_mask is None
        for index, layer in self._indexed_layers():
            cos, sin = rope.get(self.cfg.attention_types[index], (None, None))  # RoPE scaling may differ per type
            x = layer(x, cos, sin, mask_for, kv_cache, plain)
        if kv_cache is not None:
            kv_cache.advance(T)

        if self.final_norm is None:  # a pipeline stage before the last
            return x
        x = self.final_norm(x)
        if head is not None:
            return head(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)
        if self.lm_head is None:
            return F.linear(x, self.embed.weight)
        return self.lm_head(x)

    def _indexed_layers(self):
        """(global block index, block): a ModuleList's positions, or a stage's ModuleDict keys."""
        if isinstance(self.layers, nn.ModuleDict):
            return ((int(key), layer) for key, layer in self.layers.items())
        return enumerate(self.layers)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """MoE auxiliary losses of the last training forward, unweighted, mean over MoE layers."""
        return moe_aux_losses(self)

    def aux_loss(self) -> torch.Tensor | None:
        """What the trainer adds to the LM loss for the last training forward (None: nothing)."""
        return moe_aux_loss(self, self.cfg)

    def set_attention_backend(self, backend: str) -> None:
        """Force "sdpa" or "flex" for sliding-window layers ("auto": flex on CUDA when it pays)."""
        if backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"unknown attention backend {backend!r}")
        for layer in self.layers:
            if isinstance(layer, Block):
                layer.attn.backend = backend


def check_model_config(cfg: ModelConfig) -> None:
    """Fail early, naming the key, on configs this model cannot build."""
    if cfg.padded_vocab_size is None or cfg.padded_vocab_size <= 0:
        raise ConfigError("padded_vocab_size is not set (it comes from the tokenizer's vocabulary size)")
    if cfg.activation not in _ACTIVATIONS:
        raise ConfigError(f"activation {cfg.activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    if cfg.gpt_j_residual and cfg.norm_placement != "pre":
        raise ConfigError(f"gpt_j_residual needs norm_placement 'pre', got {cfg.norm_placement!r}")
    if cfg.has_attention:
        check_attention_config(cfg)
        check_rope_config(cfg)
    elif len(cfg.attention_types) != cfg.num_layers:
        raise ConfigError(f"attention_types has {len(cfg.attention_types)} entries but num_layers is {cfg.num_layers}")
    check_mamba_config(cfg)
    check_moe_config(cfg)
