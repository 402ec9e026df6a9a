"""Hugging Face ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` ↔ neoxt: config translation and names.

``model/hf_names.py`` dispatches here for the two Mamba architectures; everything else about conversion
(files, shards, tokenizer, atomic output) is shared. Our Mamba blocks use HF's parameter names and
shapes (``model/mamba.py``), so the weight map is a pure rename and a round trip is bit-exact:

    backbone.embeddings.weight            ↔ embed.weight
    backbone.layers.{i}.norm.weight       ↔ layers.{i}.norm.weight
    backbone.layers.{i}.mixer.<p>         ↔ layers.{i}.mixer.<p>
    backbone.norm_f.weight                ↔ final_norm.weight
    lm_head.weight                        ↔ lm_head.weight (absent when tied)

HF config fields → ours: ``state_size`` → ``mamba_d_state``, ``conv_kernel`` → ``mamba_d_conv``,
``expand`` → ``mamba_expand`` (and ``mamba_d_inner``), ``time_step_rank`` → ``mamba_dt_rank``,
``use_bias`` → ``mamba_use_bias_in_linears``, ``use_conv_bias`` → ``mamba_use_bias_in_conv``,
``layer_norm_epsilon`` → ``rms_norm_epsilon``; Mamba-2 also ``head_dim`` → ``mamba_headdim``,
``n_groups`` → ``mamba_ngroups``, ``chunk_size`` → ``mamba_chunk_size``, ``time_step_limit`` →
``mamba_dt_limit``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from neoxt.config.schema import ModelConfig
from neoxt.errors import ConversionError

ARCHITECTURES = {"MambaForCausalLM": "mamba", "Mamba2ForCausalLM": "mamba2"}
# Context length written for Mamba models, which have none (the state-spaces training length).
MAMBA_CONTEXT = 2048

_MIXER_PARAMS = (
    "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
    "dt_proj.bias", "A_log", "D", "dt_bias", "norm.weight", "out_proj.weight", "out_proj.bias",
)


def hf_config_object(config_json: Mapping[str, Any], arch: str):
    from transformers import Mamba2Config, MambaConfig

    raw = dict(config_json)
    if isinstance(raw.get("time_step_limit"), list):  # transformers writes inf as {"__float__": "Infinity"}
        raw["time_step_limit"] = tuple(float(v["__float__"]) if isinstance(v, dict) else float(v)
                                       for v in raw["time_step_limit"])
    return (MambaConfig if arch == "mamba" else Mamba2Config).from_dict(raw)


def model_config_from_hf(hf, arch: str, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a transformers MambaConfig / Mamba2Config."""
    if hf.hidden_act != "silu":
        raise ConversionError(f"{source}: hidden_act {hf.hidden_act!r} is not supported for Mamba (only 'silu')")
    inner = int(hf.expand * hf.hidden_size)
    fields: dict[str, Any] = dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=1, num_kv_heads=1,
        max_position_embeddings=MAMBA_CONTEXT, padded_vocab_size=hf.vocab_size, norm="rmsnorm",
        rms_norm_epsilon=hf.layer_norm_epsilon, use_bias_in_norms=False, pos_emb="none",
        no_weight_tying=not hf.tie_word_embeddings, init_method_std=float(hf.initializer_range),
        attention_types=(arch,) * hf.num_hidden_layers, activation="silu",
        mamba_d_state=hf.state_size, mamba_d_conv=hf.conv_kernel, mamba_expand=int(hf.expand),
        mamba_d_inner=inner, mamba_use_bias_in_conv=bool(hf.use_conv_bias),
        mamba_use_bias_in_linears=bool(hf.use_bias),
    )
    if arch == "mamba":
        fields["mamba_dt_rank"] = int(hf.time_step_rank)
        return ModelConfig(**fields)
    if hf.num_heads * hf.head_dim != inner:
        raise ConversionError(f"{source}: num_heads {hf.num_heads} x head_dim {hf.head_dim} != expand x hidden_size {inner}")
    lo, hi = hf.time_step_limit
    return ModelConfig(**fields, mamba_headdim=hf.head_dim, mamba_ngroups=hf.n_groups,
                       mamba_chunk_size=hf.chunk_size, mamba_dt_limit=(float(lo), float(hi)))


def architecture_for(cfg: ModelConfig) -> str:
    """``mamba`` or ``mamba2`` when every layer is that kind; a ConversionError for hybrids."""
    kinds = set(cfg.attention_types)
    if kinds in ({"mamba"}, {"mamba2"}):
        return kinds.pop()
    raise ConversionError(
        f"model config cannot be expressed as an HF model: layer types {sorted(kinds)} mix attention and "
        "Mamba (MambaForCausalLM / Mamba2ForCausalLM need every layer of one Mamba kind)"
    )


def hf_config_from_model_config(cfg: ModelConfig, arch: str, **extra: Any):
    """A transformers MambaConfig / Mamba2Config equivalent to ``cfg``."""
    from transformers import Mamba2Config, MambaConfig

    checks = {
        "norm must be rmsnorm": cfg.norm == "rmsnorm",
        "pos_emb must not be 'learned'": cfg.pos_emb != "learned",
        "mamba_d_inner must be a multiple of hidden_size": cfg.mamba_inner % cfg.hidden_size == 0,
    }
    bad = [what for what, ok in checks.items() if not ok]
    if bad:
        raise ConversionError(f"model config cannot be expressed as {_hf_class(arch)}: {'; '.join(bad)}")
    common = dict(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size, state_size=cfg.mamba_d_state,
        num_hidden_layers=cfg.num_layers, layer_norm_epsilon=cfg.rms_norm_epsilon,
        expand=cfg.mamba_inner // cfg.hidden_size, conv_kernel=cfg.mamba_d_conv,
        use_bias=cfg.mamba_use_bias_in_linears, use_conv_bias=cfg.mamba_use_bias_in_conv, hidden_act="silu",
        initializer_range=cfg.init_method_std, tie_word_embeddings=cfg.tie_word_embeddings,
        architectures=[_hf_class(arch)],
    )
    if arch == "mamba":
        return MambaConfig(**common, time_step_rank=cfg.mamba_rank, **extra)
    return Mamba2Config(
        **common, num_heads=cfg.mamba_inner // cfg.mamba_headdim, head_dim=cfg.mamba_headdim,
        n_groups=cfg.mamba_ngroups, chunk_size=cfg.mamba_chunk_size, time_step_limit=tuple(cfg.mamba_dt_limit),
        **extra,
    )


def renames(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(hf_name, our_name) for every tensor a Mamba model may hold (callers keep those that exist)."""
    yield "backbone.embeddings.weight", "embed.weight"
    for i in range(cfg.num_layers):
        yield f"backbone.layers.{i}.norm.weight", f"layers.{i}.norm.weight"
        for param in _MIXER_PARAMS:
            yield f"backbone.layers.{i}.mixer.{param}", f"layers.{i}.mixer.{param}"
    yield "backbone.norm_f.weight", "final_norm.weight"
    yield "lm_head.weight", "lm_head.weight"


def _hf_class(arch: str) -> str:
    return next(cls for cls, a in ARCHITECTURES.items() if a == arch)
