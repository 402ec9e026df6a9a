"""The Transformer Engine key layout of GPT-NeoX checkpoints ↔ the legacy one (both unsharded,
``<idx>.<name>`` keys): model knowledge shared by the GPT-NeoX importer and exporter.

Our users' fork (GeodesicResearch/geodesic-gpt-neox) trains with ``te_mha`` / ``te_layernorm_mlp``,
and its HF→NeoX converter (``huggingface/convert_hf_gptneox_to_neox.py``, ``convert_to_te_format``)
writes these names by default:

- ``attention.query_key_value.*`` → ``attention.qkv.*``; ``attention.dense.*`` → ``attention.proj.*``
  (TE ``MultiheadAttention`` with ``fuse_qkv_params``, ``input_layernorm=False``: the input norm keeps
  its legacy name);
- ``mlp.dense_h_to_4h.{weight,bias}`` / ``mlp.linear1.*`` → ``mlp.fc1_weight`` / ``mlp.fc1_bias``,
  ``mlp.dense_4h_to_h.*`` / ``mlp.linear2.*`` → ``mlp.fc2_weight`` / ``mlp.fc2_bias`` (TE
  ``LayerNormMLP``'s flat parameters);
- ``post_attention_layernorm.{weight,scale}`` / ``.bias`` → ``mlp.layer_norm_weight`` /
  ``mlp.layer_norm_bias`` (TE fuses the pre-MLP norm into the MLP; pre-norm models only).

For the GPT-NeoX shape (MHA, GeLU) that is a pure renaming: TE's interleaved fused QKV with one head
per group is GPT-NeoX's per-head ``[q, k, v]``. For LLaMA shapes the TE modules hold two layouts of
their own, converted here: with GQA the fused QKV is grouped per KV head (``[q heads of group g, k_g,
v_g]`` for each group, TE's ``qkv_weight_interleaved``) where legacy GPT-NeoX holds ``[Q | K | V]``;
a gated ``fc1`` is ``[gate | up]`` (TE applies the activation to the first half) where legacy
``linear1`` is ``[up | gate]``. Under tensor parallelism each rank holds the same layouts for its own
heads / columns, so TP merging is a plain concatenation (``neoxt.convert.neox_tp``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from neoxt.errors import ConversionError

if TYPE_CHECKING:
    import torch

    from neoxt.config.schema import ModelConfig

# TE name inside a layer -> legacy name (norm gains are filled in per config: weight or scale).
_TE_TO_LEGACY = {
    "attention.qkv.weight": "attention.query_key_value.weight",
    "attention.qkv.bias": "attention.query_key_value.bias",
    "attention.proj.weight": "attention.dense.weight",
    "attention.proj.bias": "attention.dense.bias",
    "mlp.fc1_weight": "mlp.linear1.weight",
    "mlp.fc1_bias": "mlp.linear1.bias",
    "mlp.fc2_weight": "mlp.linear2.weight",
    "mlp.fc2_bias": "mlp.linear2.bias",
}
_TE_NORMS = ("mlp.layer_norm_weight", "mlp.layer_norm_bias")
TE_NAMES = frozenset(_TE_TO_LEGACY) | frozenset(_TE_NORMS)


def is_te_layout(full: dict[str, torch.Tensor]) -> bool:
    """Whether GPT-NeoX tensors (``<idx>.<name>``) use the Transformer Engine names."""
    return any(k.split(".", 1)[1] in TE_NAMES for k in full)


def _norm_names(cfg: ModelConfig) -> tuple[str, str]:
    return ("scale", "offset") if cfg.norm == "rmsnorm" else ("weight", "bias")


def _legacy_name(name: str, cfg: ModelConfig) -> str:
    if name in _TE_TO_LEGACY:
        return _TE_TO_LEGACY[name]
    if cfg.norm_placement != "pre":
        raise ConversionError(f"tensor '{name}' (TE's fused pre-MLP norm) has no place in norm_placement "
                              f"'{cfg.norm_placement}'")
    g, b = _norm_names(cfg)
    return "post_attention_layernorm." + (g if name.endswith("weight") else b)


def _groups(cfg: ModelConfig) -> tuple[int, int, int]:
    """(KV groups, query heads per group, head dim)."""
    return cfg.num_kv_heads, cfg.num_attention_heads // cfg.num_kv_heads, cfg.head_dim


def _grouped_to_qkv(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    import torch

    ng, per, hd = _groups(cfg)
    g = t.reshape(ng, per + 2, hd, *t.shape[1:])
    q = g[:, :per].reshape(ng * per * hd, *t.shape[1:])
    k = g[:, per].reshape(ng * hd, *t.shape[1:])
    v = g[:, per + 1].reshape(ng * hd, *t.shape[1:])
    return torch.cat([q, k, v], dim=0)


def _qkv_to_grouped(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    import torch

    ng, per, hd = _groups(cfg)
    rest = t.shape[1:]
    q, k, v = torch.split(t, [ng * per * hd, ng * hd, ng * hd], dim=0)
    parts = [q.reshape(ng, per, hd, *rest), k.reshape(ng, 1, hd, *rest), v.reshape(ng, 1, hd, *rest)]
    return torch.cat(parts, dim=1).reshape(ng * (per + 2) * hd, *rest)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def te_to_legacy(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Merged TE-named tensors → the legacy GPT-NeoX layout ``neox_names`` maps (others unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in full.items():
        idx, name = key.split(".", 1)
        if name not in TE_NAMES:
            out[key] = t
            continue
        if name.startswith("attention.qkv") and cfg.num_kv_heads != cfg.num_attention_heads:
            t = _grouped_to_qkv(t, cfg)
        elif name.startswith("mlp.fc1") and cfg.gated:
            t = _swap_halves(t)
        out[f"{idx}.{_legacy_name(name, cfg)}"] = t
    return out


def legacy_to_te(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`te_to_legacy`, for ``neoxt-to-neox --te-layout`` (the fork's default)."""
    to_te = {v: k for k, v in _TE_TO_LEGACY.items()}
    if cfg.norm_placement == "pre" and not (cfg.gpt_j_residual and cfg.gpt_j_tied):
        g, b = _norm_names(cfg)
        to_te.update({f"post_attention_layernorm.{g}": _TE_NORMS[0], f"post_attention_layernorm.{b}": _TE_NORMS[1]})
    out: dict[str, torch.Tensor] = {}
    for key, t in full.items():
        idx, name = key.split(".", 1)
        te = to_te.get(name)
        if te is None:
            out[key] = t
            continue
        if te.startswith("attention.qkv") and cfg.num_kv_heads != cfg.num_attention_heads:
            t = _qkv_to_grouped(t, cfg)
        elif te.startswith("mlp.fc1") and cfg.gated:
            t = _swap_halves(t)
        out[f"{idx}.{te}"] = t
    return out
