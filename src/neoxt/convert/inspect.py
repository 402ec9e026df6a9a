"""``neoxt convert inspect PATH``: what a checkpoint holds, without loading its tensors.

PATH may also be one weights file (``.safetensors`` or a torch pickle such as a DeepSpeed
``mp_rank_00_model_states.pt``), listed with nested dict keys flattened.

Three formats, told apart by their files: a neoxt checkpoint (a run directory with ``latest`` or a
``global_step<N>`` directory with DCP ``.metadata`` + ``meta.json``), an HF model directory
(``config.json`` + safetensors/bin weights) and a GPT-NeoX (DeepSpeed) ``global_step<N>`` directory
(``mp_rank_XX``/``layer_XX-model_YY`` files, or its save directory with ``latest``). Shapes come from
metadata (DCP, safetensors headers) or memory-mapped pickles, so inspecting a 7B checkpoint reads
kilobytes, not gigabytes. GPT-NeoX tensor-parallel shards are reported merged (the shapes a TP-1
checkpoint would have), with the number of ranks alongside.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neoxt.errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    format: str  # "neoxt" | "hf" | "gpt-neox"
    iteration: int | None
    tensors: tuple[TensorInfo, ...]
    # Format-specific facts: architecture, layout, TP size, other saved state...
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "iteration": self.iteration,
            "num_params": self.num_params,
            "num_tensors": len(self.tensors),
            "details": self.details,
            "tensors": [{**asdict(t), "shape": list(t.shape)} for t in self.tensors],
        }


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Describe the checkpoint at ``path`` (any of the three formats)."""
    from neoxt.checkpoint import is_checkpoint_dir
    from neoxt.checkpoint.loading import is_hf_model_dir
    from neoxt.convert.neox_files import LAYER_FILE_RE, MP_FILE_RE

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        return _inspect_file(p)
    if is_checkpoint_dir(p):
        return _inspect_neoxt(p)
    if is_hf_model_dir(p):
        return _inspect_hf(p)
    names = os.listdir(p)
    if any(LAYER_FILE_RE.match(n) or MP_FILE_RE.match(n) for n in names):
        return _inspect_neox(p)
    latest = p / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if Path(tag).name != tag or tag in ("", ".", ".."):
            raise CheckpointError(f"{latest}: names '{tag}', which is not a directory name in {p}")
        target = p / tag
        if is_checkpoint_dir(target):
            return _inspect_neoxt(target)
        if target.is_dir():
            return _inspect_neox(p)
        raise CheckpointError(f"{latest}: names '{target.name}', which is not a directory in {p}")
    raise CheckpointError(
        f"{p}: not a recognised checkpoint (no neoxt meta.json/.metadata, no HF config.json, "
        "no GPT-NeoX mp_rank_XX/layer_XX files, no 'latest')"
    )


def _inspect_file(path: Path) -> CheckpointInfo:
    """One weights file (``.safetensors``, or a torch pickle such as ``mp_rank_00_model_states.pt``).

    Nested dicts are flattened to dotted names, so a DeepSpeed file shows ``module.sequential.2...``.
    """
    tensors: list[TensorInfo] = []
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    sl = f.get_slice(name)
                    dtype = sl.get_dtype()
                    tensors.append(TensorInfo(name, tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype.lower())))
        except Exception as err:  # noqa: BLE001 - a corrupt header, named below
            raise CheckpointError(f"{path}: cannot read safetensors header ({err})") from err
        return CheckpointInfo(str(path), "safetensors-file", None, tuple(sorted(tensors, key=lambda t: _natural(t.name))))
    import torch

    from neoxt.checkpoint.safety import load_torch_file

    obj = load_torch_file(path, mmap=True)

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append(TensorInfo(prefix, tuple(value.shape), _dtype_name(value.dtype)))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", obj)
    iteration = obj.get("iteration") if isinstance(obj, dict) else None
    return CheckpointInfo(
        str(path), "torch-file", iteration if isinstance(iteration, int) else None,
        tuple(sorted(tensors, key=lambda t: _natural(t.name))),
    )


def _inspect_neoxt(ckpt: Path) -> CheckpointInfo:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from neoxt.checkpoint import read_dcp_metadata, read_meta

    meta = read_meta(ckpt)
    md = read_dcp_metadata(ckpt)
    tensors, other = [], {}
    for key, item in md.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        if key.startswith("model."):
            tensors.append(TensorInfo(key[len("model."):], tuple(item.size), _dtype_name(item.properties.dtype)))
        else:
            section = key.split(".", 1)[0]
            other[section] = other.get(section, 0) + 1
    details: dict[str, Any] = {"model": _model_summary(ckpt), "other_state_tensors": other}
    for k in ("consumed_tokens", "consumed_samples", "neoxt_version", "source", "source_format"):
        if k in meta:
            details[k] = meta[k]
    iteration = meta.get("iteration")
    tensors.sort(key=lambda t: _natural(t.name))
    return CheckpointInfo(str(ckpt), "neoxt", int(iteration) if iteration is not None else None, tuple(tensors), details)


def _model_summary(ckpt: Path) -> str:
    """One line of the checkpoint's config.yml model section (or why it cannot be read)."""
    from neoxt.checkpoint.loading import read_checkpoint_config
    from neoxt.errors import NeoxtError

    try:
        m = read_checkpoint_config(ckpt).model
    except NeoxtError as err:
        return f"(config.yml unreadable: {err})"
    parts = [
        f"layers={m.num_layers}", f"hidden={m.hidden_size}", f"heads={m.num_attention_heads}",
        f"kv_heads={m.num_kv_heads}", f"ffn={m.intermediate_size}", f"vocab={m.padded_vocab_size}",
        f"norm={m.norm}/{m.norm_placement}", f"act={m.activation}", f"pos={m.pos_emb}",
        f"tied={m.tie_word_embeddings}",
    ]
    if m.gpt_j_residual:
        parts.append("parallel_residual")
    if "sliding" in m.attention_types:
        parts.append(f"sliding={m.attention_types.count('sliding')}x{m.sliding_window_width}")
    return " ".join(parts)


def _inspect_hf(model_dir: Path) -> CheckpointInfo:
    from neoxt.checkpoint.loading import HFWeights, read_hf_config_json

    cfg = read_hf_config_json(model_dir)
    weights = HFWeights(model_dir)
    tensors = []
    handles: dict[Path, Any] = {}
    for name in weights:
        f = weights.file_of(name)
        if f.suffix == ".safetensors":
            if f not in handles:
                from safetensors import safe_open

                try:
                    handles[f] = safe_open(str(f), framework="pt")
                except Exception as err:  # noqa: BLE001 - a corrupt header, named below
                    raise CheckpointError(f"{f}: cannot read safetensors header ({err})") from err
            sl = handles[f].get_slice(name)
            dtype = sl.get_dtype()
            tensors.append(TensorInfo(name, tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype.lower())))
        else:
            t = weights[name]
            tensors.append(TensorInfo(name, tuple(t.shape), _dtype_name(t.dtype)))
    details = {
        "architectures": cfg.get("architectures"),
        "model_type": cfg.get("model_type"),
        "files": sorted({weights.file_of(n).name for n in weights}),
        "bytes": weights.total_bytes(),
    }
    step = None
    state = model_dir / "trainer_state.json"
    if state.is_file():
        try:
            step = int(json.loads(state.read_text(encoding="utf-8")).get("global_step"))
        except (ValueError, TypeError, json.JSONDecodeError):
            step = None
    return CheckpointInfo(str(model_dir), "hf", step, tuple(sorted(tensors, key=lambda t: _natural(t.name))), details)


def _inspect_neox(path: Path) -> CheckpointInfo:
    from neoxt.convert.neox_files import (
        checkpoint_iteration,
        find_neox_files,
        load_neox_shards,
        read_client_state,
    )
    from neoxt.convert.neox_tp import tp_rule

    files = find_neox_files(path)
    client = read_client_state(files)
    shards = load_neox_shards(files)
    tensors = []
    ignored = []
    for key in sorted(shards[0], key=_natural):
        name = key.split(".", 1)[1]
        rule = tp_rule(name)
        if rule == "ignore":
            ignored.append(key)
            continue
        shapes = [tuple(s[key].shape) if key in s else None for s in shards]
        if any(s is None for s in shapes):
            raise CheckpointError(f"{files.file_for(int(key.split('.', 1)[0]), shapes.index(None))}: tensor '{key}' is missing from this shard")
        shape = list(shapes[0])
        if files.tp > 1 and rule in ("column", "qkv", "linear1"):
            shape[0] = sum(s[0] for s in shapes)
        elif files.tp > 1 and rule == "row":
            shape[1] = sum(s[1] for s in shapes)
        tensors.append(TensorInfo(key, tuple(shape), _dtype_name(shards[0][key].dtype)))
    details: dict[str, Any] = {"layout": files.layout, "model_parallel_size": files.tp}
    if isinstance(client.get("args"), dict):
        details["args"] = {k: v for k, v in client["args"].items() if isinstance(v, (int, float, str, bool)) or v is None}
    if ignored:
        details["derived_buffers_not_counted"] = len(ignored)
    return CheckpointInfo(str(files.path), "gpt-neox", checkpoint_iteration(files, client), tuple(tensors), details)


def _natural(name: str) -> tuple:
    """Sort ``layers.10`` after ``layers.9``."""
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def format_table(info: CheckpointInfo) -> str:
    """A header of facts, then one row per tensor (name, shape, dtype)."""
    facts: list[tuple[str, Any]] = [
        ("path", info.path),
        ("format", info.format),
        ("iteration", info.iteration if info.iteration is not None else "-"),
        *info.details.items(),
        ("tensors", len(info.tensors)),
        ("parameters", f"{info.num_params:,} ({_human(info.num_params)})"),
    ]
    width = max(len(k) for k, _ in facts) + 2
    lines = [f"{k + ':':<{width}}{v}" for k, v in facts]
    lines.append("")
    rows = [("name", "shape", "dtype")] + [(t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype) for t in info.tensors]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for i, (a, b, c) in enumerate(rows):
        lines.append(f"{a:<{w0}}  {b:>{w1}}  {c}")
        if i == 0:
            lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * 8}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
