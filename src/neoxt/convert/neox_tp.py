"""Tensor-parallel merge and split of GPT-NeoX checkpoints (GPT-NeoX names on both sides,
``<idx>.<name>`` keys): which tensors are column-parallel, row-parallel or replicated, how fused QKV
and ``[up | gate]`` halves are laid out per rank, and why row-parallel biases are summed under
``gpt_j_residual`` (see ``neoxt.convert.neox`` for the upstream facts). MoE expert stacks are
column-parallel (whole experts per rank) and the router replicated; Mamba layers only exist at TP 1
(``neoxt.model.neox_moe_mamba``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from neoxt.convert.neox_files import NeoxFiles
from neoxt.errors import CheckpointError, ConversionError
from neoxt.model import neox_moe_mamba
from neoxt.model.neox_names import is_gqa, qkv_sizes

if TYPE_CHECKING:
    import torch

    from neoxt.config.schema import ModelConfig

# Merge/split rules, by tensor name inside a layer.
_COLUMN = {
    neox_moe_mamba.EXPERTS_W1,  # [E*F, H]: rank r holds experts r*E/tp..(r+1)*E/tp whole
    neox_moe_mamba.EXPERTS_W2,
    "word_embeddings.weight",
    "final_linear.weight",
    "mlp.w1.weight",
    "mlp.w3.weight",
    "attention.q_norm.scale",
    "attention.q_norm.weight",
    "attention.k_norm.scale",
    "attention.k_norm.weight",
    # upstream use_qk_layernorm: gain of shape [heads_per_rank, head_dim]
    "attention.qk_layernorm.weight",
    "attention.qk_layernorm.bias",
    "attention.qk_layernorm.scale",
}


_QKV = {"attention.query_key_value.weight", "attention.query_key_value.bias"}


_LINEAR1 = {"mlp.linear1.weight", "mlp.linear1.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
            "mlp.fc1_weight", "mlp.fc1_bias"}  # TE: each rank's fc1 holds its own two halves too

# Transformer Engine's fused QKV (``neoxt.model.neox_te``): each rank holds whole KV groups in TE's
# grouped layout, so ranks concatenate (GQA included).
_TE_QKV = {"attention.qkv.weight", "attention.qkv.bias"}

# TE row-parallel biases are added once after the all-reduce (``return_bias``): replicated, never summed.
_TE_REPLICATED = {"attention.proj.bias", "mlp.fc2_bias", "mlp.layer_norm_weight", "mlp.layer_norm_bias"}


_ROW = {"attention.dense.weight", "mlp.linear2.weight", "mlp.dense_4h_to_h.weight", "mlp.w2.weight",
        "attention.proj.weight", "mlp.fc2_weight"}


_ROW_BIAS = {"attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias"}


_NORM_PARTS = ("input_layernorm.", "post_attention_layernorm.", "post_feedforward_layernorm.", "norm.")


_IGNORED_SUFFIXES = ("inv_freq", "attention.bias", "attention.masked_bias", "_extra_state")


def tp_rule(name: str, cfg: ModelConfig | None = None) -> str:
    """How a tensor (by its name inside a layer) is sharded: qkv, linear1, column, row, row_bias,
    replicated, mamba (a Mamba mixer tensor: TP 1 only), ignore (derived buffers) or unknown. A
    reward model's one-output final linear is row-parallel (the fork's is_rm output layer splits the
    hidden dimension)."""
    if cfg is not None and cfg.value_head and name == "final_linear.weight":
        return "row"
    if name in _QKV:
        return "qkv"
    if name in _LINEAR1:
        return "linear1"
    if name in _COLUMN or name in _TE_QKV:
        return "column"
    if name in _ROW:
        return "row"
    if name in _ROW_BIAS:
        return "row_bias"
    if name == "position_embeddings.weight" or name.startswith(_NORM_PARTS) or name in _TE_REPLICATED:
        return "replicated"
    if name == neox_moe_mamba.ROUTER:
        return "replicated"
    if name.startswith("mixer."):
        return "mamba"  # TP 1 only (check_tp)
    if name.endswith(_IGNORED_SUFFIXES):
        return "ignore"
    return "unknown"


def merge_tp(
    shards: list[dict[str, torch.Tensor]], cfg: ModelConfig, files: NeoxFiles
) -> dict[str, torch.Tensor]:
    """Merge TP shards into the tensors a TP-1 checkpoint of the same model would hold."""
    import torch

    tp = len(shards)
    neox_moe_mamba.check_tp(cfg, tp)
    keys0 = set(shards[0])
    for r in range(1, tp):
        diff = keys0.symmetric_difference(shards[r])
        if diff:
            key = sorted(diff)[0]
            idx = int(key.split(".", 1)[0])
            where = files.file_for(idx, r if key not in shards[r] else 0)
            raise CheckpointError(f"{where}: tensor '{key}' is missing from this shard but present in another TP rank")
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys0, key=lambda k: (int(k.split(".", 1)[0]), k)):
        idx_s, name = key.split(".", 1)
        idx = int(idx_s)
        parts = [s[key] for s in shards]
        rule = tp_rule(name, cfg)
        if rule == "unknown":
            raise ConversionError(f"{files.file_for(idx)}: unknown GPT-NeoX tensor '{key}' (layer {idx}); not converted")
        if rule == "ignore":
            continue
        for r, t in enumerate(parts[1:], start=1):
            if t.shape != parts[0].shape:
                raise CheckpointError(
                    f"{files.file_for(idx, r)}: tensor '{key}' has shape {tuple(t.shape)} on rank {r} "
                    f"but {tuple(parts[0].shape)} on rank 0"
                )
        if tp == 1:
            out[key] = parts[0]
        elif rule == "column":
            out[key] = torch.cat(parts, dim=0)
        elif rule == "row":
            _need_dim(parts[0], 2, files.file_for(idx), key)
            out[key] = torch.cat(parts, dim=1)
        elif rule == "replicated":
            out[key] = _merge_replicated(parts)
        elif rule == "row_bias":
            out[key] = _merge_row_bias(parts, summed=cfg.gpt_j_residual)
        elif rule == "linear1":
            if cfg.gated:
                halves = [_chunk2(t, files.file_for(idx, r), key) for r, t in enumerate(parts)]
                out[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                out[key] = torch.cat(parts, dim=0)
        elif rule == "qkv":
            if is_gqa(cfg):
                sizes = qkv_sizes(cfg, tp)
                split = []
                for r, t in enumerate(parts):
                    if t.shape[0] != sum(sizes):
                        raise CheckpointError(
                            f"{files.file_for(idx, r)}: tensor '{key}' has {t.shape[0]} rows, config expects "
                            f"{sum(sizes)} per rank (heads {cfg.num_attention_heads}, kv heads {cfg.num_kv_heads}, TP {tp})"
                        )
                    split.append(torch.split(t, sizes, dim=0))
                out[key] = torch.cat([s[j] for j in range(3) for s in split], dim=0)
            else:
                out[key] = torch.cat(parts, dim=0)
    return out


def _need_dim(t: torch.Tensor, dim: int, path: Path, key: str) -> None:
    if t.dim() != dim:
        raise CheckpointError(f"{path}: tensor '{key}' has {t.dim()} dimensions, expected {dim}")


def _chunk2(t: torch.Tensor, path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if t.shape[0] % 2:
        raise CheckpointError(f"{path}: tensor '{key}' has {t.shape[0]} rows; a gated MLP needs an even number")
    a, b = t.chunk(2, dim=0)
    return a, b


def _merge_replicated(parts: list[torch.Tensor]) -> torch.Tensor:
    import torch

    if all(torch.equal(parts[0], p) for p in parts[1:]):
        return parts[0]
    # Copies drifted apart (e.g. sequence-parallel norms): their mean, as upstream's converter does.
    return (torch.stack([p.double() for p in parts]).mean(0)).to(parts[0].dtype)


def _merge_row_bias(parts: list[torch.Tensor], summed: bool) -> torch.Tensor:
    import torch

    if not summed:
        return _merge_replicated(parts)
    if all(torch.equal(parts[0], p) for p in parts[1:]):
        return parts[0] * len(parts)  # exact for power-of-two TP sizes; the inverse of split_tp
    return torch.stack([p.double() for p in parts]).sum(0).to(parts[0].dtype)


def split_tp(full: dict[str, torch.Tensor], cfg: ModelConfig, tp: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`merge_tp`: TP-1 GPT-NeoX tensors -> ``tp`` shards (copies, contiguous)."""
    import torch

    if tp < 1:
        raise ConversionError(f"model parallel size must be >= 1, got {tp}")
    for what, n in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_kv_heads", cfg.num_kv_heads),
        ("intermediate_size", cfg.intermediate_size),
        ("padded_vocab_size", cfg.padded_vocab_size or 0),
    ):
        if n % tp:
            raise ConversionError(f"cannot split {what}={n} over model parallel size {tp}")
    neox_moe_mamba.check_tp(cfg, tp)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, t in full.items():
        name = key.split(".", 1)[1]
        rule = tp_rule(name, cfg)
        if rule == "column" or (rule == "linear1" and not cfg.gated) or (rule == "qkv" and not is_gqa(cfg)):
            pieces = list(t.chunk(tp, dim=0))
        elif rule == "row":
            pieces = list(t.chunk(tp, dim=1))
        elif rule == "linear1":
            up, gate = t.chunk(2, dim=0)
            pieces = [torch.cat([u, g], dim=0) for u, g in zip(up.chunk(tp, 0), gate.chunk(tp, 0), strict=True)]
        elif rule == "qkv":
            q, k, v = torch.split(t, qkv_sizes(cfg, 1), dim=0)
            pieces = [
                torch.cat(list(p), dim=0)
                for p in zip(q.chunk(tp, 0), k.chunk(tp, 0), v.chunk(tp, 0), strict=True)
            ]
        elif rule == "row_bias" and cfg.gpt_j_residual:
            pieces = [t / tp] * tp  # each rank adds its copy before the all-reduce
        elif rule in ("replicated", "row_bias", "mamba"):  # mamba: TP 1 only (check_tp)
            pieces = [t] * tp
        else:
            raise ConversionError(f"internal: no TP split rule for GPT-NeoX tensor '{key}'")
        for r, piece in enumerate(pieces):
            # torch.save writes a view's whole storage: every shard must own exactly its bytes.
            shards[r][key] = piece.contiguous() if tp == 1 else compact(piece)
    return shards


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor owning exactly its bytes: q/k/v and up/gate are views into a fused tensor,
    which some writers would save whole. Tensors that already own their storage are not copied."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t
