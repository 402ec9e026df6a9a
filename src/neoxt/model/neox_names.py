"""GPT-NeoX checkpoint names ↔ our parameter names (both unsharded): model knowledge, kept with the
model (torchtitan's ``state_dict_adapter`` role) and shared by the GPT-NeoX importer and exporter.

Layer indices are those of GPT-NeoX's ``GPT2ModelPipe.specs``: 0 = embedding, 2..L+1 = transformer
layers, L+3 = final norm, L+4 = ``final_linear`` (see ``neoxt.convert.neox`` for the full list of
upstream facts: fused QKV per head or ``[Q|K|V]`` for GQA, ``[up | gate]`` gated MLP, legacy
``w1/w2/w3`` llama names, the OLMo-3 fork's post-norms and q/k norms; Mamba layers and MoE MLPs in
``neox_moe_mamba``). Shapes are checked against
``parameter_shapes`` (the model itself on the meta device), so there is one shape table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from neoxt.config.schema import MAMBA_TYPES
from neoxt.errors import CheckpointError, ConversionError
from neoxt.model import neox_moe_mamba as mm
from neoxt.model.shapes import parameter_shapes

if TYPE_CHECKING:
    import torch

    from neoxt.config.schema import ModelConfig

EMBED_IDX = 0
FIRST_LAYER_IDX = 2


class SourceFiles(Protocol):
    """Where tensors came from, for error messages (``neoxt.convert.neox_files.NeoxFiles``)."""

    path: Path

    def file_for(self, idx: int, rank: int = 0) -> Path: ...


def is_gqa(cfg: ModelConfig) -> bool:
    """GQA checkpoints hold ``[Q | K | V]`` contiguously; MHA ones interleave q, k, v per head."""
    return cfg.num_kv_heads != cfg.num_attention_heads


def qkv_sizes(cfg: ModelConfig, tp: int) -> list[int]:
    """Rows of Q, K and V in one tensor-parallel rank's fused QKV (GQA layout)."""
    hd = cfg.head_dim
    return [cfg.num_attention_heads * hd // tp, cfg.num_kv_heads * hd // tp, cfg.num_kv_heads * hd // tp]


def _norm_names(cfg: ModelConfig) -> tuple[str, str]:
    """GPT-NeoX suffixes of a norm's (gain, bias): LayerNorm weight/bias, RMSNorm scale/offset."""
    return ("scale", "offset") if cfg.norm == "rmsnorm" else ("weight", "bias")


def _layer_norm_map(cfg: ModelConfig) -> dict[str, str]:
    """GPT-NeoX norm module -> our norm module, for one transformer layer."""
    if cfg.norm_placement == "olmo3":
        return {"post_attention_layernorm": "attn_norm", "post_feedforward_layernorm": "mlp_norm"}
    if cfg.norm_placement != "pre":
        raise ConversionError(
            f"norm_placement '{cfg.norm_placement}' has no GPT-NeoX checkpoint layout (GPT-NeoX is pre-norm; the OLMo-3 fork is 'olmo3')"
        )
    if cfg.gpt_j_residual and cfg.gpt_j_tied:
        return {"input_layernorm": "attn_norm"}
    return {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


def _uses_norm_bias(cfg: ModelConfig) -> bool:
    return cfg.norm == "layernorm" and cfg.use_bias_in_norms


class _Importer:
    """One GPT-NeoX → neoxt mapping in progress: the tensors not yet used, the ones mapped, and the
    checks (missing, unexpected, wrong shape) that name the file and tensor at fault."""

    def __init__(self, full: dict[str, torch.Tensor], cfg: ModelConfig, files: SourceFiles | None):
        self.cfg, self.files = cfg, files
        self.remaining = dict(full)
        self.out: dict[str, torch.Tensor] = {}
        self.expected = parameter_shapes(cfg)
        self.g, self.b = _norm_names(cfg)

    def where(self, idx: int) -> str:
        return str(self.files.file_for(idx)) if self.files else f"layer {idx}"

    def take(self, idx: int, name: str) -> torch.Tensor:
        key = f"{idx}.{name}"
        if key not in self.remaining:
            raise CheckpointError(f"{self.where(idx)}: tensor '{key}' is missing (config {_config_hint(name, self.cfg)})")
        return self.remaining.pop(key)

    def put(self, ours: str, t: torch.Tensor, idx: int, name: str) -> None:
        want = self.expected.get(ours)
        if want is None:
            raise CheckpointError(f"{self.where(idx)}: tensor '{idx}.{name}' has no place in this config "
                                  f"({_config_hint(name, self.cfg)})")
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{self.where(idx)}: tensor '{idx}.{name}' has shape {tuple(t.shape)}, the config expects {want} for {ours}"
            )
        self.out[ours] = t

    def move(self, ours: str, idx: int, name: str) -> None:
        self.put(ours, self.take(idx, name), idx, name)

    def maybe(self, idx: int, name: str) -> bool:
        return f"{idx}.{name}" in self.remaining

    def norms(self, idx: int, p: str) -> None:
        cfg, g, b = self.cfg, self.g, self.b
        for neox_norm, our_norm in _layer_norm_map(cfg).items():
            self.move(p + our_norm + ".weight", idx, f"{neox_norm}.{g}")
            if _uses_norm_bias(cfg) or self.maybe(idx, f"{neox_norm}.{b}"):
                self.move(p + our_norm + ".bias", idx, f"{neox_norm}.{b}")
        unused = "input_layernorm" if cfg.norm_placement == "olmo3" else \
            "post_attention_layernorm" if (cfg.gpt_j_residual and cfg.gpt_j_tied) else None
        for n in (g, b) if unused else ():
            self.remaining.pop(f"{idx}.{unused}.{n}", None)  # built but never used (the fork / upstream)

    def attention(self, idx: int, p: str) -> None:
        import torch

        cfg, hd = self.cfg, self.cfg.head_dim
        for kind in ("weight", "bias"):
            name = f"attention.query_key_value.{kind}"
            if kind == "bias" and not (cfg.use_bias_in_attn_linear or self.maybe(idx, name)):
                continue
            t = self.take(idx, name)
            rows = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * hd
            if t.shape[0] != rows:
                raise CheckpointError(
                    f"{self.where(idx)}: tensor '{idx}.{name}' has {t.shape[0]} rows, config expects {rows} "
                    f"(heads {cfg.num_attention_heads}, kv heads {cfg.num_kv_heads}, head dim {hd})"
                )
            if is_gqa(cfg):
                q, k, v = torch.split(t, qkv_sizes(cfg, 1), dim=0)
            else:
                per_head = t.reshape(cfg.num_attention_heads, 3, hd, *t.shape[1:])
                q, k, v = (per_head[:, j].reshape(cfg.num_attention_heads * hd, *t.shape[1:]) for j in range(3))
            for proj, part in (("q", q), ("k", k), ("v", v)):
                self.put(p + f"attn.{proj}.{kind}", part, idx, name)
            name = f"attention.dense.{kind}"
            if kind == "weight" or cfg.use_bias_in_attn_linear or self.maybe(idx, name):
                self.move(p + f"attn.o.{kind}", idx, name)
        if cfg.use_separate_qk_norms:
            for proj in ("q", "k"):
                scale = f"attention.{proj}_norm.scale"
                self.move(p + f"attn.{proj}_norm.weight", idx, scale if self.maybe(idx, scale) else f"attention.{proj}_norm.weight")
        elif cfg.use_qk_layernorm:
            self.move(p + "attn.qk_norm.weight", idx, f"attention.qk_layernorm.{self.g}")
            if _uses_norm_bias(cfg):
                self.move(p + "attn.qk_norm.bias", idx, f"attention.qk_layernorm.{self.b}")

    def mlp(self, idx: int, p: str) -> None:
        cfg = self.cfg
        if self.maybe(idx, "mlp.w1.weight"):  # legacy llama naming: w1 = gate, w3 = up, w2 = down
            for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                self.move(p + f"mlp.{ours}.weight", idx, f"mlp.{theirs}.weight")
            return
        l1, l2 = ("mlp.linear1", "mlp.linear2") if self.maybe(idx, "mlp.linear1.weight") else ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
        for kind in ("weight", "bias"):
            if kind == "bias" and not (cfg.use_bias_in_mlp or self.maybe(idx, f"{l1}.bias")):
                continue
            t = self.take(idx, f"{l1}.{kind}")
            if not cfg.gated:
                self.put(p + f"mlp.up.{kind}", t, idx, f"{l1}.{kind}")
                continue
            if t.shape[0] != 2 * cfg.intermediate_size:
                raise CheckpointError(
                    f"{self.where(idx)}: tensor '{idx}.{l1}.{kind}' has {t.shape[0]} rows, config expects "
                    f"{2 * cfg.intermediate_size} ([up | gate] halves of intermediate_size {cfg.intermediate_size}); "
                    f"the checkpoint implies intermediate_size {t.shape[0] // 2}"
                )
            up, gate = t.chunk(2, dim=0)
            self.put(p + f"mlp.up.{kind}", up, idx, f"{l1}.{kind}")
            self.put(p + f"mlp.gate.{kind}", gate, idx, f"{l1}.{kind}")
        for kind in ("weight", "bias"):
            if kind == "weight" or cfg.use_bias_in_mlp or self.maybe(idx, f"{l2}.bias"):
                self.move(p + f"mlp.down.{kind}", idx, f"{l2}.{kind}")


def _check_layer_indices(full: dict[str, torch.Tensor], cfg: ModelConfig, files: SourceFiles | None) -> None:
    outside = ("norm.", "final_linear.", "word_embeddings.", "position_embeddings.")
    layer_idxs = sorted({int(k.split(".", 1)[0]) for k in full if not k.split(".", 1)[1].startswith(outside)})
    if [i - FIRST_LAYER_IDX for i in layer_idxs] != list(range(cfg.num_layers)):
        raise CheckpointError(
            f"{files.path if files else 'checkpoint'}: holds transformer layers at indices {layer_idxs} "
            f"({len(layer_idxs)} layers), config num_layers={cfg.num_layers} expects indices "
            f"{FIRST_LAYER_IDX}..{cfg.num_layers + 1}"
        )


def neox_to_neoxt(
    full: dict[str, torch.Tensor], cfg: ModelConfig, files: SourceFiles | None = None
) -> dict[str, torch.Tensor]:
    """Map merged GPT-NeoX tensors (``<idx>.<name>``) to our parameter names, checking every shape.

    ``cfg.padded_vocab_size`` must already be set (from the embedding). Raises CheckpointError naming
    the file and tensor for anything missing, unexpected or of the wrong shape.
    """
    _check_layer_indices(full, cfg, files)
    m = _Importer(full, cfg, files)
    m.move("embed.weight", EMBED_IDX, "word_embeddings.weight")
    if cfg.pos_emb == "learned":
        m.move("pos_embed.weight", EMBED_IDX, "position_embeddings.weight")
    for i in range(cfg.num_layers):
        idx, p = i + FIRST_LAYER_IDX, f"layers.{i}."
        if cfg.attention_types[i] in MAMBA_TYPES:
            mm.import_mamba(m, idx, p, m.g, m.b, _uses_norm_bias(cfg))
            continue
        m.norms(idx, p)
        m.attention(idx, p)
        if cfg.is_moe_layer(i):
            mm.import_moe(m, idx, p)
        else:
            m.mlp(idx, p)
    final_norm_idx = cfg.num_layers + 3
    m.move("final_norm.weight", final_norm_idx, f"norm.{m.g}")
    if _uses_norm_bias(cfg) or m.maybe(final_norm_idx, f"norm.{m.b}"):
        m.move("final_norm.bias", final_norm_idx, f"norm.{m.b}")
    if cfg.no_weight_tying or cfg.value_head:  # a reward model always has its own (scalar) final linear
        m.move("lm_head.weight", cfg.num_layers + 4, "final_linear.weight")
    if m.remaining:
        key = sorted(m.remaining)[0]
        idx = int(key.split(".", 1)[0])
        raise CheckpointError(f"{m.where(idx)}: tensor '{key}' has no place in this config "
                              f"({_config_hint(key.split('.', 1)[1], cfg)})")
    missing = sorted(set(m.expected) - set(m.out))
    if missing:
        raise CheckpointError(f"{files.path if files else 'checkpoint'}: no GPT-NeoX tensor provides '{missing[0]}'")
    return m.out


def _config_hint(name: str, cfg: ModelConfig) -> str:
    """The config keys that decide whether/how a GPT-NeoX tensor exists, for error messages."""
    if hint := mm.config_hint(name, cfg):
        return hint
    if "final_linear" in name:
        return f"no_weight_tying={cfg.no_weight_tying}"
    if "layernorm" in name or name.startswith("norm."):
        return f"norm={cfg.norm}, norm_placement={cfg.norm_placement}, use_bias_in_norms={cfg.use_bias_in_norms}"
    if "q_norm" in name or "k_norm" in name:
        return f"use_separate_qk_norms={cfg.use_separate_qk_norms}"
    if "attention" in name:
        return f"use_bias_in_attn_linear={cfg.use_bias_in_attn_linear}"
    if "mlp" in name:
        return f"activation={cfg.activation}, use_bias_in_mlp={cfg.use_bias_in_mlp}"
    if "position_embeddings" in name:
        return f"pos_emb={cfg.pos_emb}"
    return f"num_layers={cfg.num_layers}"


def neoxt_to_neox(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> unsharded GPT-NeoX tensors (``<idx>.<name>``, current upstream naming)."""
    import torch

    expected = parameter_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"neoxt state dict lacks '{missing[0]}' (config and checkpoint disagree)")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CheckpointError(f"neoxt state dict has '{extra[0]}', which this config does not define")
    for k, want in expected.items():
        if tuple(sd[k].shape) != want:
            raise CheckpointError(f"neoxt tensor '{k}' has shape {tuple(sd[k].shape)}, config expects {want}")

    g, b = _norm_names(cfg)
    hd, heads = cfg.head_dim, cfg.num_attention_heads
    out: dict[str, torch.Tensor] = {f"{EMBED_IDX}.word_embeddings.weight": sd["embed.weight"]}
    if cfg.pos_emb == "learned":
        out[f"{EMBED_IDX}.position_embeddings.weight"] = sd["pos_embed.weight"]
    norm_map = _layer_norm_map(cfg)
    for i in range(cfg.num_layers):
        idx, p = i + FIRST_LAYER_IDX, f"layers.{i}."
        if cfg.attention_types[i] in MAMBA_TYPES:
            out.update(mm.export_mamba(sd, p, idx, g, b))
            continue
        if cfg.is_moe_layer(i):
            out.update(mm.export_moe(sd, cfg, p, idx))
        for neox_norm, our_norm in norm_map.items():
            out[f"{idx}.{neox_norm}.{g}"] = sd[p + our_norm + ".weight"]
            if p + our_norm + ".bias" in sd:
                out[f"{idx}.{neox_norm}.{b}"] = sd[p + our_norm + ".bias"]
        if cfg.gpt_j_residual and cfg.gpt_j_tied:
            # Upstream still builds (and saves) the unused second norm; keep strict loading happy.
            out[f"{idx}.post_attention_layernorm.{g}"] = torch.ones_like(sd[p + "attn_norm.weight"])
            if p + "attn_norm.bias" in sd:
                out[f"{idx}.post_attention_layernorm.{b}"] = torch.zeros_like(sd[p + "attn_norm.bias"])
        for kind in ("weight", "bias"):
            if p + f"attn.q.{kind}" not in sd:
                continue
            q, k, v = (sd[p + f"attn.{x}.{kind}"] for x in ("q", "k", "v"))
            if is_gqa(cfg):
                qkv = torch.cat([q, k, v], dim=0)
            else:
                rest = q.shape[1:]
                qkv = torch.stack([t.reshape(heads, hd, *rest) for t in (q, k, v)], dim=1).reshape(3 * heads * hd, *rest)
            out[f"{idx}.attention.query_key_value.{kind}"] = qkv
            out[f"{idx}.attention.dense.{kind}"] = sd[p + f"attn.o.{kind}"]
        if cfg.use_separate_qk_norms:
            out[f"{idx}.attention.q_norm.scale"] = sd[p + "attn.q_norm.weight"]
            out[f"{idx}.attention.k_norm.scale"] = sd[p + "attn.k_norm.weight"]
        elif cfg.use_qk_layernorm:
            out[f"{idx}.attention.qk_layernorm.{g}"] = sd[p + "attn.qk_norm.weight"]
            if p + "attn.qk_norm.bias" in sd:
                out[f"{idx}.attention.qk_layernorm.{b}"] = sd[p + "attn.qk_norm.bias"]
        for kind in ("weight", "bias"):
            if p + f"mlp.up.{kind}" not in sd:
                continue
            up = sd[p + f"mlp.up.{kind}"]
            out[f"{idx}.mlp.linear1.{kind}"] = torch.cat([up, sd[p + f"mlp.gate.{kind}"]], 0) if cfg.gated else up
            out[f"{idx}.mlp.linear2.{kind}"] = sd[p + f"mlp.down.{kind}"]
    final_idx = cfg.num_layers + 3
    out[f"{final_idx}.norm.{g}"] = sd["final_norm.weight"]
    if "final_norm.bias" in sd:
        out[f"{final_idx}.norm.{b}"] = sd["final_norm.bias"]
    if cfg.no_weight_tying or cfg.value_head:  # a reward model always has its own (scalar) final linear
        out[f"{cfg.num_layers + 4}.final_linear.weight"] = sd["lm_head.weight"]
    return out


def check_supported(cfg: ModelConfig) -> None:
    """Configs whose GPT-NeoX weights we cannot map one to one."""
    if cfg.pos_emb not in ("rotary", "learned", "none"):
        raise ConversionError(f"config: pos_emb '{cfg.pos_emb}' is not supported")
    if cfg.num_attention_heads % cfg.num_kv_heads:
        raise ConversionError(
            f"config: num_attention_heads {cfg.num_attention_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}"
        )
    mm.check_supported(cfg)
