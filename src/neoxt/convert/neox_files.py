"""GPT-NeoX (DeepSpeed) checkpoint files: finding them, loading them safely, writing them.

Two layouts. Sequential (``pipe_parallel_size: 0``): ``mp_rank_XX_model_states.pt`` holds the
DeepSpeed engine state with the weights under ``["module"]`` as ``sequential.<idx>.<name>`` (the
OLMo-3 fork's converter nests ``["module"]["module"]`` with ``<idx>.<name>`` keys; both are read).
Pipeline (``pipe_parallel_size >= 1``): ``layer_<idx:02d>-model_<tp:02d>-model_states.pt`` holds one
layer's plain state dict; ``mp_rank_XX_model_states.pt`` then has ``module: None`` plus the client
state (``iteration``, ``args``).

Pickles: every file loads with the weights-only unpickler plus the plain-data classes DeepSpeed and
GPT-NeoX store (numpy RNG state, ``argparse.Namespace``); see ``neoxt.checkpoint.safety``. A file that
needs anything else is refused naming the class, unless the user passes ``--trust-checkpoint``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from neoxt.errors import CheckpointError, ConversionError
from neoxt.io import publish_dir, temp_dir_beside, write_text_atomic
from neoxt.model.neox_names import EMBED_IDX
from neoxt.progress import track

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


def torch_load(path: Path) -> Any:
    """A GPT-NeoX/DeepSpeed ``.pt`` file, memory-mapped, through ``neoxt.checkpoint.safety``'s allowlist."""
    from neoxt.checkpoint.safety import load_torch_file

    return load_torch_file(path, mmap=True)


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
        if Path(tag).name != tag or tag in ("", ".", ".."):  # a tag names a directory here, never a path
            raise CheckpointError(f"{p / 'latest'}: names '{tag}', which is not a directory name in {p}")
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
    obj = torch_load(mp0)
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
        for r in track(range(files.tp), "reading shards", "file", total=files.tp):
            path = files.file_for(0, r)
            shards[r] = _module_weights(torch_load(path), path)
        return shards
    import torch

    jobs = [(idx, r) for idx in files.layer_indices for r in range(files.tp)]
    for idx, r in track(jobs, "reading layer files", "file", total=len(jobs)):
        path = files.file_for(idx, r)
        sd = torch_load(path)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
        for name, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: '{name}' is not a tensor ({type(value).__name__})")
            shards[r][f"{idx}.{name}"] = value
    return shards


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

    Files go to a hidden temporary directory beside it first (``neoxt.io``); it is renamed when complete.
    """
    import torch

    from neoxt.config import config_to_yaml

    tp = len(shards)
    model = run_cfg.model
    tag = f"global_step{iteration}"
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / tag
    if final.exists():
        raise ConversionError(f"{final}: already exists; choose another --output-dir")
    tmp = temp_dir_beside(final, ConversionError)
    try:
        if pipeline:
            by_layer: dict[int, list[dict[str, torch.Tensor]]] = {}
            for r, shard in enumerate(shards):
                for key, t in shard.items():
                    idx_s, name = key.split(".", 1)
                    by_layer.setdefault(int(idx_s), [{} for _ in range(tp)])[r][name] = t
            jobs = [(idx, r) for idx in sorted(by_layer) for r in range(tp)]
            for idx, r in track(jobs, "writing layer files", "file", total=len(jobs)):
                torch.save(by_layer[idx][r], tmp / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            for r in range(tp):
                torch.save(_client_state(run_cfg, model, iteration, tp, True), tmp / f"mp_rank_{r:02d}_model_states.pt")
        else:
            for r in track(range(tp), "writing shards", "file", total=tp):
                state = _client_state(run_cfg, model, iteration, tp, False)
                state["module"] = {f"sequential.{k}": t for k, t in shards[r].items()}
                torch.save(state, tmp / f"mp_rank_{r:02d}_model_states.pt")
        (tmp / "configs").mkdir()
        (tmp / "configs" / "neoxt_export.yml").write_text(config_to_yaml(run_cfg), encoding="utf-8")
        publish_dir(tmp, final)
        write_text_atomic(out_dir / "latest", tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
