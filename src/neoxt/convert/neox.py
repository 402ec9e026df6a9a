"""GPT-NeoX (DeepSpeed) checkpoints <-> neoxt state dicts.

Facts this module relies on (read from upstream GPT-NeoX, ``megatron/model/{gpt2_model,transformer,
norms}.py``, ``megatron/mpu/layers.py``, ``megatron/checkpointing.py``, ``tools/ckpts/``):

* Layer indices are those of ``GPT2ModelPipe.specs``: 0 = embedding (``word_embeddings.weight``,
  ``position_embeddings.weight`` for learned positions), 1 = a function (no weights), 2..L+1 = the
  transformer layers, L+2 = a function, L+3 = final norm (``norm.weight``/``norm.bias``, or
  ``norm.scale`` for RMSNorm), L+4 = ``final_linear.weight`` (only without weight tying).
* Two file layouts. Sequential (``pipe_parallel_size: 0``): ``mp_rank_XX_model_states.pt`` holds the
  DeepSpeed engine state with the weights under ``["module"]`` as ``sequential.<idx>.<name>``.
  Pipeline (``pipe_parallel_size >= 1``): ``layer_<idx:02d>-model_<tp:02d>-model_states.pt`` holds one
  layer's plain state dict; ``mp_rank_XX_model_states.pt`` then has ``module: None`` plus the client
  state (``iteration``, ``args``). The users' OLMo-3 fork converter writes the sequential file with
  ``["module"]["module"]`` holding ``<idx>.<name>`` keys (DeepSpeed PipelineModule names); both are read.
* Tensor parallelism. Column-parallel (split on dim 0): ``word_embeddings``, ``final_linear``,
  ``attention.query_key_value``, ``mlp.linear1`` (legacy ``dense_h_to_4h``, llama ``w1``/``w3``), and the
  fork's ``attention.q_norm``/``k_norm`` (they normalise each rank's slice). Row-parallel (split on
  dim 1): ``attention.dense``, ``mlp.linear2`` (legacy ``dense_4h_to_h``, llama ``w2``). Row-parallel
  biases are *not* split (``RowParallelLinear``: "bias is not parallelized"): every rank holds the
  whole bias. Without ``gpt_j_residual`` it is added once after the all-reduce, so the ranks' copies
  are equal and one is taken. With ``gpt_j_residual`` each rank adds its copy *before* the single
  all-reduce, so the effective bias is their sum (which is what upstream's converter and merge20b.py
  compute; upstream's converter also sums in the non-parallel-residual case, which is a bug we do not
  copy). Norms are replicated.
* Fused QKV. MHA: each rank's output rows are ``[heads_r, 3, head_dim]`` (per-head interleaved q,k,v),
  so merged ranks give ``[heads, 3, head_dim]``. GQA (``num_kv_heads`` set and != heads): each rank
  holds ``[Q_r | K_r | V_r]`` contiguously (``gqa_project``), so ranks are split before merging.
* Gated MLP (``Gated_Activation``): ``x, gate = linear1(h).chunk(2)``, out = act(gate) * x. The first
  half is our ``up``, the second our ``gate`` -- per TP rank, so each rank holds ``[up_r | gate_r]``.
  Legacy llama naming: ``w1`` = gate, ``w3`` = up, ``w2`` = down.
* OLMo-3 fork (``norm_placement: olmo3``, ``use_separate_qk_norms``), as its converter writes it:
  ``attention.q_norm.scale`` [heads*head_dim], ``attention.k_norm.scale`` [kv_heads*head_dim],
  ``post_attention_layernorm.scale`` (norm on the attention output, our ``attn_norm``),
  ``post_feedforward_layernorm.scale`` (norm on the MLP output, our ``mlp_norm``). The fork builds an
  ``input_layernorm`` it never uses; a checkpoint saved by the fork may hold it and it is ignored.
  (Found with the code search in the users' fork: ``huggingface/convert_hf_olmo_to_neox.py`` and its
  README; upstream has no OLMo-3. Its converter shards q_norm/k_norm with TP, so at TP > 1 the fork
  normalises each rank's slice; the merged weights here give the TP-1 model, i.e. HF's OLMo-3.)
* ``attention.rotary_emb.inv_freq`` (``rotary_save_freqs_buffer``) is derived, not a weight: ignored.
* Upstream ``use_qk_layernorm``: ``attention.qk_layernorm.*`` has a [heads_per_rank, head_dim] gain,
  split over TP with the heads. (With LayerNorm and TP > 1 upstream normalises over each rank's
  heads only, so such a checkpoint is mapped exactly but its logits differ slightly from TP 1's.)

Export (``neoxt-to-neox``) writes current upstream names (``mlp.linear1``/``linear2``, RMSNorm
``scale``; for the OLMo-3 fork the names its converter writes, without the unused
``input_layernorm``), the ``iteration`` and ``args`` client state GPT-NeoX checks on load, ``latest``
and ``configs/``. It holds weights only -- no optimizer, scheduler or RNG state -- so GPT-NeoX should
load it with ``finetune: true`` (or ``no_load_optim`` + ``no_load_rng``).

Pickles: layer files are plain tensor dicts and load with ``weights_only=True``. ``mp_rank`` files
hold DeepSpeed engine state (argparse/numpy/DeepSpeed objects) that the weights-only unpickler may
refuse; for those files -- and only files inside the checkpoint directory the user named -- we fall
back to ``weights_only=False``, i.e. we trust the user's own checkpoint as DeepSpeed itself does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from neoxt.errors import CheckpointError, ConversionError

if TYPE_CHECKING:
    import torch

    from neoxt.config.schema import ModelConfig, RunConfig

log = logging.getLogger(__name__)

Layout = Literal["sequential", "pipeline"]

LAYER_FILE_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MP_FILE_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_KEY_RE = re.compile(r"^(?:sequential\.|module\.)?(\d+)\.(.+)$")
_TIED_RE = re.compile(r"^(?:module\.)?tied_modules\.embed\.(.+)$")
_STEP_RE = re.compile(r"global_step(\d+)$")

EMBED_IDX = 0
FIRST_LAYER_IDX = 2

# Merge/split rules, by tensor name inside a layer.
_COLUMN = {
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
_LINEAR1 = {"mlp.linear1.weight", "mlp.linear1.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"}
_ROW = {"attention.dense.weight", "mlp.linear2.weight", "mlp.dense_4h_to_h.weight", "mlp.w2.weight"}
_ROW_BIAS = {"attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias"}
_NORM_PARTS = ("input_layernorm.", "post_attention_layernorm.", "post_feedforward_layernorm.", "norm.")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias", "_extra_state")


def _rule(name: str) -> str:
    if name in _QKV:
        return "qkv"
    if name in _LINEAR1:
        return "linear1"
    if name in _COLUMN:
        return "column"
    if name in _ROW:
        return "row"
    if name in _ROW_BIAS:
        return "row_bias"
    if name == "position_embeddings.weight" or name.startswith(_NORM_PARTS):
        return "replicated"
    if name.endswith(_IGNORED_SUFFIXES):
        return "ignore"
    return "unknown"


# ----------------------------------------------------------------------------------------------
# Progress: tqdm on a terminal, a one-line log every few seconds otherwise.


def _progress(items: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False)
        return
    last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        if time.monotonic() - last >= 10.0 or (i == total and total > 1):
            print(f"{desc}: {i}/{total} files", file=sys.stderr, flush=True)
            last = time.monotonic()


# ----------------------------------------------------------------------------------------------
# Reading GPT-NeoX checkpoint files.


@dataclass(frozen=True)
class NeoxFiles:
    """Where a GPT-NeoX ``global_stepN`` directory keeps its weights."""

    path: Path
    layout: Layout
    tp: int
    # Pipeline layout: the layer indices that have files.
    layer_indices: tuple[int, ...] = ()

    def file_for(self, idx: int, rank: int = 0) -> Path:
        if self.layout == "pipeline":
            return self.path / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt"
        return self.path / f"mp_rank_{rank:02d}_model_states.pt"


# Non-tensor globals DeepSpeed engine files hold that are plain data (numpy RNG state, argparse
# namespaces); allowing them keeps those files on the weights-only unpickler.
_PLAIN_GLOBALS = frozenset(
    {
        "argparse.Namespace",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
    }
)


def _plain_global(name: str) -> Any | None:
    import importlib

    if name not in _PLAIN_GLOBALS and not re.fullmatch(r"numpy\.dtypes\.\w+DType", name):
        return None
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _torch_load(path: Path, *, allow_pickle: bool) -> Any:
    """Load a checkpoint file memory-mapped, with the weights-only unpickler whenever possible."""
    import pickle

    import torch

    errors = (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except errors as err:
        first_error = err
    if not allow_pickle:
        raise CheckpointError(f"{path}: cannot read as a tensor file: {str(first_error).splitlines()[0]}")
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        plain = [_plain_global(n) for n in needed]
        if "numpy.dtype" in needed:  # numpy >= 1.25 pickles dtypes through their numpy.dtypes classes
            import numpy as np

            plain += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
        if all(g is not None for g in plain):
            with torch.serialization.safe_globals(plain):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except errors:
        pass
    try:
        # DeepSpeed engine state with DeepSpeed's own classes. This file sits inside the checkpoint
        # directory the user asked us to convert: trust it as DeepSpeed itself does.
        log.info("%s: loading with weights_only=False (DeepSpeed objects in the pickle)", path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file, named below
        raise CheckpointError(f"{path}: cannot read checkpoint file: {type(err).__name__}: {err}") from err


def find_neox_files(path: str | os.PathLike, expected_tp: int | None = None) -> NeoxFiles:
    """Locate the weight files of a GPT-NeoX checkpoint and check no TP shard is missing.

    ``path`` is a ``global_stepN`` directory, or a save directory whose ``latest`` names one.
    ``expected_tp`` (the config's ``model_parallel_size``) makes a missing higher rank an error.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such GPT-NeoX checkpoint directory")
    names = os.listdir(p)
    if not any(LAYER_FILE_RE.match(n) or MP_FILE_RE.match(n) for n in names) and (p / "latest").is_file():
        tag = (p / "latest").read_text(encoding="utf-8").strip()
        if not (p / tag).is_dir():
            raise CheckpointError(f"{p / 'latest'}: names '{tag}', which is not a directory in {p}")
        return find_neox_files(p / tag, expected_tp)

    layer_files = [(int(m.group(1)), int(m.group(2))) for n in names if (m := LAYER_FILE_RE.match(n))]
    mp_ranks = sorted(int(m.group(1)) for n in names if (m := MP_FILE_RE.match(n)))
    if layer_files:
        ranks = {r for _, r in layer_files}
        tp = max(max(ranks) + 1, expected_tp or 1)
        indices = tuple(sorted({i for i, _ in layer_files}))
        present = set(layer_files)
        files = NeoxFiles(p, "pipeline", tp, indices)
        for idx in indices:
            for r in range(tp):
                if (idx, r) not in present:
                    raise CheckpointError(
                        f"{files.file_for(idx, r)}: missing tensor-parallel shard {r} of layer {idx} "
                        f"({_why_tp(tp, max(ranks) + 1, expected_tp)})"
                    )
        return files
    if mp_ranks:
        tp = max(mp_ranks[-1] + 1, expected_tp or 1)
        files = NeoxFiles(p, "sequential", tp)
        for r in range(tp):
            if r not in mp_ranks:
                raise CheckpointError(
                    f"{files.file_for(0, r)}: missing tensor-parallel shard {r} "
                    f"({_why_tp(tp, mp_ranks[-1] + 1, expected_tp)})"
                )
        return files
    raise CheckpointError(
        f"{p}: not a GPT-NeoX checkpoint (no mp_rank_XX_model_states.pt or layer_XX-model_YY-model_states.pt files)"
    )


def _why_tp(tp: int, found: int, expected: int | None) -> str:
    if expected and expected > found:
        return f"the config's model_parallel_size is {expected}; files exist only for ranks below {found}"
    return f"files exist for {tp} model-parallel ranks"


def _split_key(key: str) -> tuple[int, str] | None:
    if m := _TIED_RE.match(key):
        return EMBED_IDX, m.group(1)
    if m := _KEY_RE.match(key):
        return int(m.group(1)), m.group(2)
    return None


def _module_weights(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model weights inside an ``mp_rank`` file, as ``<idx>.<name>`` keys."""
    import torch

    module = obj.get("module") if isinstance(obj, dict) else None
    if isinstance(module, dict) and set(module) == {"module"} and isinstance(module["module"], dict):
        module = module["module"]  # the OLMo-3 fork converter's nesting
    if not isinstance(module, dict) or not module:
        raise CheckpointError(
            f"{path}: holds no model weights ('module' is empty); a pipeline checkpoint needs its "
            "layer_XX-model_YY-model_states.pt files"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in module.items():
        parts = _split_key(key)
        if parts is None:
            raise CheckpointError(f"{path}: tensor '{key}' is not a GPT-NeoX layer weight (expected sequential.<idx>.<name>)")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: '{key}' is not a tensor ({type(value).__name__})")
        out[f"{parts[0]}.{parts[1]}"] = value
    return out


def read_client_state(files: NeoxFiles) -> dict[str, Any]:
    """``iteration`` and ``args`` of rank 0's ``mp_rank_00`` file (empty when there is none)."""
    mp0 = files.path / "mp_rank_00_model_states.pt"
    if not mp0.is_file():
        return {}
    obj = _torch_load(mp0, allow_pickle=True)
    if not isinstance(obj, dict):
        return {}
    return {k: obj[k] for k in ("iteration", "global_steps", "args", "total_iters") if k in obj}


def checkpoint_iteration(files: NeoxFiles, client_state: dict[str, Any]) -> int:
    for key in ("iteration", "total_iters", "global_steps"):
        if isinstance(client_state.get(key), int):
            return int(client_state[key])
    if m := _STEP_RE.search(files.path.name):
        return int(m.group(1))
    return 0


def load_neox_shards(files: NeoxFiles) -> list[dict[str, torch.Tensor]]:
    """Every TP rank's weights as ``<layer_idx>.<name>`` -> tensor (memory-mapped where possible)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(files.tp)]
    if files.layout == "sequential":
        for r in _progress(range(files.tp), files.tp, "reading shards"):
            path = files.file_for(0, r)
            shards[r] = _module_weights(_torch_load(path, allow_pickle=True), path)
        return shards
    import torch

    jobs = [(idx, r) for idx in files.layer_indices for r in range(files.tp)]
    for idx, r in _progress(jobs, len(jobs), "reading layer files"):
        path = files.file_for(idx, r)
        sd = _torch_load(path, allow_pickle=False)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
        for name, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: '{name}' is not a tensor ({type(value).__name__})")
            shards[r][f"{idx}.{name}"] = value
    return shards


# ----------------------------------------------------------------------------------------------
# Tensor-parallel merge and split (GPT-NeoX names on both sides, <idx>.<name> keys).


def _gqa(cfg: ModelConfig) -> bool:
    return cfg.num_kv_heads != cfg.num_attention_heads


def _qkv_sizes(cfg: ModelConfig, tp: int) -> list[int]:
    hd = cfg.head_dim
    return [cfg.num_attention_heads * hd // tp, cfg.num_kv_heads * hd // tp, cfg.num_kv_heads * hd // tp]


def merge_tp(
    shards: list[dict[str, torch.Tensor]], cfg: ModelConfig, files: NeoxFiles
) -> dict[str, torch.Tensor]:
    """Merge TP shards into the tensors a TP-1 checkpoint of the same model would hold."""
    import torch

    tp = len(shards)
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
        rule = _rule(name)
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
            if _gqa(cfg):
                sizes = _qkv_sizes(cfg, tp)
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
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, t in full.items():
        name = key.split(".", 1)[1]
        rule = _rule(name)
        if rule == "column" or (rule == "linear1" and not cfg.gated) or (rule == "qkv" and not _gqa(cfg)):
            pieces = list(t.chunk(tp, dim=0))
        elif rule == "row":
            pieces = list(t.chunk(tp, dim=1))
        elif rule == "linear1":
            up, gate = t.chunk(2, dim=0)
            pieces = [torch.cat([u, g], dim=0) for u, g in zip(up.chunk(tp, 0), gate.chunk(tp, 0), strict=True)]
        elif rule == "qkv":
            q, k, v = torch.split(t, _qkv_sizes(cfg, 1), dim=0)
            pieces = [
                torch.cat(list(p), dim=0)
                for p in zip(q.chunk(tp, 0), k.chunk(tp, 0), v.chunk(tp, 0), strict=True)
            ]
        elif rule == "row_bias" and cfg.gpt_j_residual:
            pieces = [t / tp] * tp  # each rank adds its copy before the all-reduce
        elif rule in ("replicated", "row_bias"):
            pieces = [t] * tp
        else:
            raise ConversionError(f"internal: no TP split rule for GPT-NeoX tensor '{key}'")
        for r, piece in enumerate(pieces):
            # torch.save writes a view's whole storage: every shard must own exactly its bytes.
            shards[r][key] = piece.contiguous() if tp == 1 else _compact(piece)
    return shards


# ----------------------------------------------------------------------------------------------
# GPT-NeoX names <-> our names (both unsharded).


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


def neox_to_neoxt(
    full: dict[str, torch.Tensor], cfg: ModelConfig, files: NeoxFiles | None = None
) -> dict[str, torch.Tensor]:
    """Map merged GPT-NeoX tensors (``<idx>.<name>``) to our parameter names, checking every shape.

    ``cfg.padded_vocab_size`` must already be set (from the embedding). Raises CheckpointError naming
    the file and tensor for anything missing, unexpected or of the wrong shape.
    """
    import torch

    def where(idx: int) -> str:
        return str(files.file_for(idx)) if files else f"layer {idx}"

    layer_idxs = sorted(
        {int(k.split(".", 1)[0]) for k in full if not k.split(".", 1)[1].startswith(("norm.", "final_linear.", "word_embeddings.", "position_embeddings."))}
    )
    found_layers = [i - FIRST_LAYER_IDX for i in layer_idxs]
    if found_layers != list(range(cfg.num_layers)):
        raise CheckpointError(
            f"{files.path if files else 'checkpoint'}: holds transformer layers at indices {layer_idxs} "
            f"({len(layer_idxs)} layers), config num_layers={cfg.num_layers} expects indices "
            f"{FIRST_LAYER_IDX}..{cfg.num_layers + 1}"
        )
    remaining = dict(full)
    out: dict[str, torch.Tensor] = {}
    expected = expected_shapes(cfg)

    def take(idx: int, name: str) -> torch.Tensor:
        key = f"{idx}.{name}"
        if key not in remaining:
            raise CheckpointError(f"{where(idx)}: tensor '{key}' is missing (config {_config_hint(name, cfg)})")
        return remaining.pop(key)

    def put(ours: str, t: torch.Tensor, idx: int, name: str) -> None:
        want = expected.get(ours)
        if want is None:
            raise CheckpointError(f"{where(idx)}: tensor '{idx}.{name}' has no place in this config ({_config_hint(name, cfg)})")
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{where(idx)}: tensor '{idx}.{name}' has shape {tuple(t.shape)}, the config expects {want} for {ours}"
            )
        out[ours] = t

    def maybe(idx: int, name: str) -> bool:
        return f"{idx}.{name}" in remaining

    g, b = _norm_names(cfg)
    hd = cfg.head_dim
    put("embed.weight", take(EMBED_IDX, "word_embeddings.weight"), EMBED_IDX, "word_embeddings.weight")
    if cfg.pos_emb == "learned":
        put("pos_embed.weight", take(EMBED_IDX, "position_embeddings.weight"), EMBED_IDX, "position_embeddings.weight")
    norm_map = _layer_norm_map(cfg)
    for i in range(cfg.num_layers):
        idx = i + FIRST_LAYER_IDX
        p = f"layers.{i}."
        for neox_norm, our_norm in norm_map.items():
            put(p + our_norm + ".weight", take(idx, f"{neox_norm}.{g}"), idx, f"{neox_norm}.{g}")
            if _uses_norm_bias(cfg) or maybe(idx, f"{neox_norm}.{b}"):
                put(p + our_norm + ".bias", take(idx, f"{neox_norm}.{b}"), idx, f"{neox_norm}.{b}")
        if cfg.norm_placement == "olmo3":
            for n in (g, b):
                remaining.pop(f"{idx}.input_layernorm.{n}", None)  # built but unused by the fork
        elif cfg.gpt_j_residual and cfg.gpt_j_tied:
            for n in (g, b):
                remaining.pop(f"{idx}.post_attention_layernorm.{n}", None)  # built but unused upstream

        for kind in ("weight", "bias"):
            name = f"attention.query_key_value.{kind}"
            if kind == "bias" and not (cfg.use_bias_in_attn_linear or maybe(idx, name)):
                continue
            t = take(idx, name)
            rows = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * hd
            if t.shape[0] != rows:
                raise CheckpointError(
                    f"{where(idx)}: tensor '{idx}.{name}' has {t.shape[0]} rows, config expects {rows} "
                    f"(heads {cfg.num_attention_heads}, kv heads {cfg.num_kv_heads}, head dim {hd})"
                )
            if _gqa(cfg):
                q, k, v = torch.split(t, _qkv_sizes(cfg, 1), dim=0)
            else:
                per_head = t.reshape(cfg.num_attention_heads, 3, hd, *t.shape[1:])
                q, k, v = (per_head[:, j].reshape(cfg.num_attention_heads * hd, *t.shape[1:]) for j in range(3))
            for proj, part in (("q", q), ("k", k), ("v", v)):
                put(p + f"attn.{proj}.{kind}", part, idx, name)
            name = f"attention.dense.{kind}"
            if kind == "weight" or cfg.use_bias_in_attn_linear or maybe(idx, name):
                put(p + f"attn.o.{kind}", take(idx, name), idx, name)
        if cfg.use_separate_qk_norms:
            for proj in ("q", "k"):
                name = f"attention.{proj}_norm.scale" if maybe(idx, f"attention.{proj}_norm.scale") else f"attention.{proj}_norm.weight"
                put(p + f"attn.{proj}_norm.weight", take(idx, name), idx, name)
        elif cfg.use_qk_layernorm:
            put(p + "attn.qk_norm.weight", take(idx, f"attention.qk_layernorm.{g}"), idx, f"attention.qk_layernorm.{g}")
            if _uses_norm_bias(cfg):
                put(p + "attn.qk_norm.bias", take(idx, f"attention.qk_layernorm.{b}"), idx, f"attention.qk_layernorm.{b}")

        if maybe(idx, "mlp.w1.weight"):  # legacy llama naming: w1 = gate, w3 = up, w2 = down
            put(p + "mlp.gate.weight", take(idx, "mlp.w1.weight"), idx, "mlp.w1.weight")
            put(p + "mlp.up.weight", take(idx, "mlp.w3.weight"), idx, "mlp.w3.weight")
            put(p + "mlp.down.weight", take(idx, "mlp.w2.weight"), idx, "mlp.w2.weight")
        else:
            l1, l2 = ("mlp.linear1", "mlp.linear2") if maybe(idx, "mlp.linear1.weight") else ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
            for kind in ("weight", "bias"):
                if kind == "bias" and not (cfg.use_bias_in_mlp or maybe(idx, f"{l1}.bias")):
                    continue
                t = take(idx, f"{l1}.{kind}")
                if cfg.gated:
                    if t.shape[0] != 2 * cfg.intermediate_size:
                        raise CheckpointError(
                            f"{where(idx)}: tensor '{idx}.{l1}.{kind}' has {t.shape[0]} rows, config expects "
                            f"{2 * cfg.intermediate_size} ([up | gate] halves of intermediate_size {cfg.intermediate_size}); "
                            f"the checkpoint implies intermediate_size {t.shape[0] // 2}"
                        )
                    up, gate = t.chunk(2, dim=0)
                    put(p + f"mlp.up.{kind}", up, idx, f"{l1}.{kind}")
                    put(p + f"mlp.gate.{kind}", gate, idx, f"{l1}.{kind}")
                else:
                    put(p + f"mlp.up.{kind}", t, idx, f"{l1}.{kind}")
            for kind in ("weight", "bias"):
                if kind == "bias" and not (cfg.use_bias_in_mlp or maybe(idx, f"{l2}.bias")):
                    continue
                put(p + f"mlp.down.{kind}", take(idx, f"{l2}.{kind}"), idx, f"{l2}.{kind}")

    final_norm_idx = cfg.num_layers + 3
    put("final_norm.weight", take(final_norm_idx, f"norm.{g}"), final_norm_idx, f"norm.{g}")
    if _uses_norm_bias(cfg) or maybe(final_norm_idx, f"norm.{b}"):
        put("final_norm.bias", take(final_norm_idx, f"norm.{b}"), final_norm_idx, f"norm.{b}")
    head_idx = cfg.num_layers + 4
    if cfg.no_weight_tying:
        put("lm_head.weight", take(head_idx, "final_linear.weight"), head_idx, "final_linear.weight")
    if remaining:
        key = sorted(remaining)[0]
        idx = int(key.split(".", 1)[0])
        raise CheckpointError(f"{where(idx)}: tensor '{key}' has no place in this config ({_config_hint(key.split('.', 1)[1], cfg)})")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(f"{files.path if files else 'checkpoint'}: no GPT-NeoX tensor provides '{missing[0]}'")
    return out


def _config_hint(name: str, cfg: ModelConfig) -> str:
    """The config keys that decide whether/how a GPT-NeoX tensor exists, for error messages."""
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


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``cfg`` (the Transformer's state-dict contract)."""
    if cfg.padded_vocab_size is None:
        raise ConversionError("padded_vocab_size is unknown (read it from the embedding first)")
    h, v, hd = cfg.hidden_size, cfg.padded_vocab_size, cfg.head_dim
    q, kv, inter = cfg.num_attention_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, h)}
    if cfg.pos_emb == "learned":
        shapes["pos_embed.weight"] = (cfg.max_position_embeddings, h)
    norm_bias = _uses_norm_bias(cfg)
    norms = ["attn_norm"] if (cfg.gpt_j_residual and cfg.gpt_j_tied) else ["attn_norm", "mlp_norm"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for n in norms:
            shapes[p + n + ".weight"] = (h,)
            if norm_bias:
                shapes[p + n + ".bias"] = (h,)
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            shapes[p + f"attn.{proj}.weight"] = (rows, h)
            if cfg.use_bias_in_attn_linear:
                shapes[p + f"attn.{proj}.bias"] = (rows,)
        shapes[p + "attn.o.weight"] = (h, q)
        if cfg.use_bias_in_attn_linear:
            shapes[p + "attn.o.bias"] = (h,)
        if cfg.use_separate_qk_norms:
            shapes[p + "attn.q_norm.weight"] = (q,)
            shapes[p + "attn.k_norm.weight"] = (kv,)
        elif cfg.use_qk_layernorm:
            shapes[p + "attn.qk_norm.weight"] = (cfg.num_attention_heads, hd)
            if norm_bias:
                shapes[p + "attn.qk_norm.bias"] = (cfg.num_attention_heads, hd)
        branches = ("up", "gate") if cfg.gated else ("up",)
        for br in branches:
            shapes[p + f"mlp.{br}.weight"] = (inter, h)
            if cfg.use_bias_in_mlp:
                shapes[p + f"mlp.{br}.bias"] = (inter,)
        shapes[p + "mlp.down.weight"] = (h, inter)
        if cfg.use_bias_in_mlp:
            shapes[p + "mlp.down.bias"] = (h,)
    shapes["final_norm.weight"] = (h,)
    if norm_bias:
        shapes["final_norm.bias"] = (h,)
    if cfg.no_weight_tying:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def neoxt_to_neox(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> unsharded GPT-NeoX tensors (``<idx>.<name>``, current upstream naming)."""
    import torch

    expected = expected_shapes(cfg)
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
            if _gqa(cfg):
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
    if cfg.no_weight_tying:
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


# ----------------------------------------------------------------------------------------------
# Whole-checkpoint import and export.


@dataclass(frozen=True)
class NeoxImport:
    state_dict: dict[str, Any]
    model: ModelConfig
    iteration: int
    files: NeoxFiles


def read_neox_checkpoint(path: str | os.PathLike, cfg: ModelConfig, expected_tp: int | None = None, dtype: Any = None) -> NeoxImport:
    """Read, merge and map a GPT-NeoX checkpoint to our state dict; nothing is written."""
    check_supported(cfg)
    files = find_neox_files(path, expected_tp)
    client = read_client_state(files)
    shards = load_neox_shards(files)
    emb_key = f"{EMBED_IDX}.word_embeddings.weight"
    if emb_key not in shards[0]:
        raise CheckpointError(f"{files.file_for(EMBED_IDX)}: tensor '{emb_key}' (word embeddings) is missing")
    vocab = sum(s[emb_key].shape[0] for s in shards)
    model = dataclasses.replace(cfg, padded_vocab_size=vocab)
    full = merge_tp(shards, model, files)
    sd = neox_to_neoxt(full, model, files)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    sd = {k: _compact(v) for k, v in sd.items()}
    return NeoxImport(sd, model, checkpoint_iteration(files, client), files)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor owning exactly its bytes: q/k/v and up/gate are views into a fused tensor,
    which some writers would save whole. Tensors that already own their storage are not copied."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def write_neoxt_checkpoint(run_dir: Path, iteration: int, sd: dict[str, Any], run_cfg: RunConfig, meta: dict[str, Any]) -> Path:
    """The one place the import writes a neoxt checkpoint: DESIGN.md layout via ``neoxt.checkpoint``,
    plus the run directory's ``config.yml`` (as ``hf-to-neoxt`` writes it)."""
    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_to_yaml

    text = config_to_yaml(run_cfg)
    step = save_checkpoint(run_dir, iteration, {"model": sd}, text, meta=meta)
    (run_dir / "config.yml").write_text(text, encoding="utf-8")
    return step


def import_neox(
    input_dir: str | os.PathLike,
    run_cfg: RunConfig,
    output_dir: str | os.PathLike,
    iteration: int | None = None,
    dtype: Any = None,
) -> Path:
    """GPT-NeoX ``global_stepN`` -> new neoxt run directory ``output_dir``. Returns its step dir.

    ``run_cfg`` is the user's GPT-NeoX config (loaded by ``load_config``); its ``padded_vocab_size``
    is taken from the checkpoint's embedding. Everything is read and checked before anything is
    written; the run directory is built under a temporary name and renamed when complete, so a
    failure leaves nothing at ``output_dir``.
    """
    out = Path(output_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: output path already exists and is not empty; remove it or pick another")
    res = read_neox_checkpoint(input_dir, run_cfg.model, run_cfg.parallelism.model_parallel_size, dtype)
    new_cfg = dataclasses.replace(run_cfg, model=res.model)
    step = res.iteration if iteration is None else iteration
    from neoxt.convert.hf import publish_dir, temp_dir_beside

    tmp = temp_dir_beside(out)
    try:
        meta = {
            "source": str(Path(input_dir).absolute()),
            "source_format": f"gpt-neox-{res.files.layout}",
            "source_model_parallel_size": res.files.tp,
            "consumed_tokens": 0,
            "consumed_samples": 0,
        }
        write_neoxt_checkpoint(tmp, step, res.state_dict, new_cfg, meta)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / f"global_step{step}"


def _client_state(cfg: RunConfig, model: ModelConfig, iteration: int, tp: int, pipeline: bool) -> dict[str, Any]:
    """The non-weight entries DeepSpeed's and GPT-NeoX's ``load_checkpoint`` read from mp_rank files."""
    return {
        "module": None,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": None,
        "frozen_param_shapes": None,
        "shared_params": [],
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": [],
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": iteration * cfg.training.train_batch_size,
        "dp_world_size": 1,
        "mp_world_size": tp,
        "ds_config": None,
        "ds_version": "0.0.0-neoxt",
        "iteration": iteration,
        "args": {
            "num_layers": model.num_layers,
            "hidden_size": model.hidden_size,
            "num_attention_heads": model.num_attention_heads,
            "max_position_embeddings": model.max_position_embeddings,
            "make_vocab_size_divisible_by": model.make_vocab_size_divisible_by,
            "padded_vocab_size": model.padded_vocab_size,
            "tokenizer_type": cfg.tokenizer.tokenizer_type,
            "model_parallel_size": tp,
        },
        "neoxt_pipeline_layout": pipeline,
    }


def write_neox_checkpoint(
    shards: list[dict[str, torch.Tensor]],
    out_dir: Path,
    iteration: int,
    run_cfg: RunConfig,
    pipeline: bool,
) -> Path:
    """Write ``<out_dir>/global_step<N>/`` (+ ``latest``, ``configs/``) in the chosen upstream layout.

    Files go to ``global_step<N>.tmp/`` first; the directory is renamed when complete.
    """
    import torch

    from neoxt.config import config_to_yaml

    tp = len(shards)
    model = run_cfg.model
    tag = f"global_step{iteration}"
    out_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = out_dir / tag, out_dir / f"{tag}.tmp"
    if final.exists():
        raise ConversionError(f"{final}: already exists; choose another --output-dir")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if pipeline:
            by_layer: dict[int, list[dict[str, torch.Tensor]]] = {}
            for r, shard in enumerate(shards):
                for key, t in shard.items():
                    idx_s, name = key.split(".", 1)
                    by_layer.setdefault(int(idx_s), [{} for _ in range(tp)])[r][name] = t
            jobs = [(idx, r) for idx in sorted(by_layer) for r in range(tp)]
            for idx, r in _progress(jobs, len(jobs), "writing layer files"):
                torch.save(by_layer[idx][r], tmp / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            for r in range(tp):
                torch.save(_client_state(run_cfg, model, iteration, tp, True), tmp / f"mp_rank_{r:02d}_model_states.pt")
        else:
            for r in _progress(range(tp), tp, "writing shards"):
                state = _client_state(run_cfg, model, iteration, tp, False)
                state["module"] = {f"sequential.{k}": t for k, t in shards[r].items()}
                torch.save(state, tmp / f"mp_rank_{r:02d}_model_states.pt")
        (tmp / "configs").mkdir()
        (tmp / "configs" / "neoxt_export.yml").write_text(config_to_yaml(run_cfg), encoding="utf-8")
        os.replace(tmp, final)
        latest_tmp = out_dir / f".latest.tmp.{os.getpid()}"
        latest_tmp.write_text(tag, encoding="utf-8")
        os.replace(latest_tmp, out_dir / "latest")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_neox(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_parallel_size: int = 1,
    pipeline: bool = False,
) -> Path:
    """neoxt checkpoint (run dir or ``global_stepN``) -> GPT-NeoX checkpoint. Returns the step dir.

    Tensors keep their saved dtype, so ``neoxt-to-neox`` then ``neox-to-neoxt`` is bit-exact.
    """
    from neoxt.checkpoint import read_meta, resolve_checkpoint
    from neoxt.checkpoint.loading import read_checkpoint_config, read_checkpoint_model_state

    ckpt = resolve_checkpoint(checkpoint)
    run_cfg = read_checkpoint_config(ckpt)
    model = run_cfg.model
    check_supported(model)
    iteration = int(read_meta(ckpt).get("iteration", 0))
    sd = read_checkpoint_model_state(ckpt, model)
    full = neoxt_to_neox(sd, model)
    shards = split_tp(full, model, model_parallel_size)
    out_cfg = dataclasses.replace(
        run_cfg,
        parallelism=dataclasses.replace(
            run_cfg.parallelism, model_parallel_size=model_parallel_size, pipe_parallel_size=1 if pipeline else 0
        ),
    )
    out = Path(output_dir)
    created = not out.exists()
    try:
        return write_neox_checkpoint(shards, out, iteration, out_cfg, pipeline)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# `neoxt convert neox-to-neoxt` / `neoxt convert neoxt-to-neox` (plugged into convert/commands.py).

_DTYPES = ("fp32", "bf16", "fp16")


def register_convert(conv: Any) -> None:
    p = conv.add_parser(
        "neox-to-neoxt",
        help="GPT-NeoX (DeepSpeed) global_stepN, sequential or pipeline, any TP size → new neoxt run dir",
    )
    p.add_argument("--input-dir", required=True, metavar="DIR", help=".../global_stepN, or the save dir holding `latest`")
    p.add_argument(
        "--config", nargs="+", metavar="YML",
        help="the run's GPT-NeoX config file(s) (default: the YAML files in <input-dir>/configs/)",
    )
    p.add_argument("--output-dir", metavar="DIR", help="new neoxt run directory (default: <save dir>-neoxt beside it)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="cast weights (default: keep the checkpoint's)")
    p.add_argument("--iteration", type=int, default=None, metavar="N", help="write global_step<N> (default: the checkpoint's)")
    p.set_defaults(handler=run_neox_to_neoxt)

    p = conv.add_parser(
        "neoxt-to-neox",
        help="neoxt checkpoint → GPT-NeoX (DeepSpeed) global_stepN + latest + configs/ (weights only: "
        "load it in GPT-NeoX with finetune: true)",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="neoxt run directory or its global_step<N>")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="GPT-NeoX save directory (created if missing)")
    p.add_argument("--model-parallel-size", type=int, default=1, metavar="N", help="tensor-parallel shards to write")
    p.add_argument(
        "--pipeline-layout", action="store_true",
        help="write layer_XX-model_YY files (pipe_parallel_size >= 1) instead of sequential mp_rank_XX files",
    )
    p.set_defaults(handler=run_neoxt_to_neox)


def _default_configs(input_dir: Path) -> list[str]:
    files = find_neox_files(input_dir)
    found = sorted(str(f) for f in (files.path / "configs").glob("*.y*ml"))
    if not found:
        raise ConversionError(f"{files.path}: no configs/*.yml inside the checkpoint; pass the run's config with --config")
    return found


def run_neox_to_neoxt(args: Any) -> int:
    import torch

    from neoxt.config import load_config

    input_dir = Path(args.input_dir)
    configs = args.config or _default_configs(input_dir)
    run_cfg = load_config(configs)
    if args.output_dir:
        out = Path(args.output_dir)
    else:
        save_dir = find_neox_files(input_dir).path.parent
        out = save_dir.with_name(save_dir.name + "-neoxt")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype or "")
    step = import_neox(input_dir, run_cfg, out, iteration=args.iteration, dtype=dtype)
    print(f"neoxt: wrote {step} (config: {step.parent / 'config.yml'})", file=sys.stderr)
    return 0


def run_neoxt_to_neox(args: Any) -> int:
    step = export_neox(args.checkpoint, args.output_dir, args.model_parallel_size, args.pipeline_layout)
    layout = "pipeline" if args.pipeline_layout else "sequential"
    print(f"neoxt: wrote {step} ({layout}, model_parallel_size {args.model_parallel_size})", file=sys.stderr)
    return 0
