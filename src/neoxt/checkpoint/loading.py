"""``neoxt.load_model`` and the readers behind it: neoxt checkpoints and HF model directories.

``load_model(path, device="cpu", dtype=None)`` accepts

- a neoxt run directory (follows its ``latest`` file),
- a ``global_step<N>`` checkpoint directory (DCP files + ``config.yml`` + ``meta.json``),
- a Hugging Face model directory (``config.json`` + safetensors or ``pytorch_model.bin``), mapped
  in memory (GPTNeoX, LLaMA, OLMo-3),

and returns our ``Transformer`` in eval mode. Models are built on the meta device and filled by
assignment, so loading costs one read of the weights and no random initialisation.
``dtype=None`` keeps the stored dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from neoxt.config.schema import ModelConfig, RunConfig
from neoxt.dtypes import dtype_of
from neoxt.errors import CheckpointError, ConfigError, ConversionError

HF_CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


# ----------------------------------------------------------------------------------------------
# Hugging Face directories


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / HF_CONFIG).is_file()


def read_hf_config_json(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / HF_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConversionError(f"{path}: missing (not a Hugging Face model directory)") from err
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from err


class HFWeights(Mapping):
    """Tensor name → tensor of an HF model directory, read lazily shard by shard.

    Every shard named by an index file is checked up front, so a missing shard fails before any
    output is written, naming the shard and one tensor it should hold.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.dir / index_name
            if index.is_file():
                self._read_index(index)
                return
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            path = self.dir / single
            if path.is_file():
                for name in self._names_in(path):
                    self._where[name] = path
                return
        raise ConversionError(
            f"{self.dir}: no weights found ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
        )

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConversionError(f"{index}: not a valid weight index ({err})") from err
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise ConversionError(f"{index}: weight_map entry for {name} is {shard!r}, not a file name in {self.dir}")
            path = self.dir / shard
            if not path.is_file():
                raise ConversionError(f"{index}: shard {shard} is missing (it holds tensor {name})")
            self._where[name] = path

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return list(self._handle(path).keys())
        return list(self._bin_file(path).keys())

    def _handle(self, path: Path):
        if path not in self._open:
            from safetensors import SafetensorError, safe_open

            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ConversionError(f"{path}: cannot read safetensors file ({err})") from err
        return self._open[path]

    def _bin_file(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin:
            from neoxt.checkpoint.safety import load_torch_file

            loaded = load_torch_file(path, mmap=True)
            if not isinstance(loaded, dict):
                raise ConversionError(f"{path}: holds {type(loaded).__name__}, not a dict of PyTorch weights")
            self._bin[path] = loaded
        return self._bin[path]

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._where[name]
        if path.suffix == ".safetensors":
            try:
                return self._handle(path).get_tensor(name)
            except Exception as err:
                raise ConversionError(f"{path}: cannot read tensor {name} ({err})") from err
        return self._bin_file(path)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._where.values()))


def read_hf_model(model_dir: str | os.PathLike, dtype: torch.dtype | None = None, progress=iter):
    """(ModelConfig, our state dict, architecture, transformers config) for an HF model directory."""
    from neoxt.model.hf_names import (
        detect_architecture,
        hf_config_object,
        hf_to_neoxt_state_dict,
        model_config_from_hf,
    )

    model_dir = Path(model_dir)
    raw = read_hf_config_json(model_dir)
    source = str(model_dir / HF_CONFIG)
    arch = detect_architecture(raw, source)
    try:
        hf_cfg = hf_config_object(raw, arch)
    except (TypeError, ValueError, KeyError) as err:
        raise ConversionError(f"{source}: invalid config ({err})") from err
    cfg = model_config_from_hf(hf_cfg, arch, source)
    weights = HFWeights(model_dir)
    sd = hf_to_neoxt_state_dict(weights, cfg, arch, source=str(model_dir), progress=progress, dtype=dtype)
    return cfg, sd, arch, hf_cfg


# What a conversion needs from a Hub repository (weights in safetensors, else PyTorch pickles).
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja"]


def resolve_hf_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local HF model directory as is; an ``org/name`` Hub id downloaded into the HF cache first
    (with ``HF_HUB_OFFLINE=1``: the cached snapshot only), at ``revision`` (branch, tag or commit,
    e.g. the fork's ``global_step1000`` branches) when given."""
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise ConversionError(f"--revision {revision}: {source} is a local directory; a revision applies to Hub ids")
        return path
    text = str(source)
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise ConversionError(f"{source}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(text, revision=revision, allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
    except Exception as err:  # the hub client raises many types (offline, 404, auth, network)
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConversionError(f"{source}: not a local directory and not downloadable from the Hub "
                              f"({type(err).__name__}: {first})") from None
    return local


# ----------------------------------------------------------------------------------------------
# neoxt checkpoints


def read_checkpoint_config(ckpt_dir: str | os.PathLike) -> RunConfig:
    """The RunConfig a checkpoint was saved with (its ``config.yml``)."""
    from neoxt.config import load_config

    path = Path(ckpt_dir) / "config.yml"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a neoxt checkpoint directory)")
    return load_config([str(path)])


def saved_model_tensors(ckpt_dir: str | os.PathLike) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Names, shapes and dtypes of the ``model`` tensors a DCP checkpoint holds (from its metadata)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from neoxt.checkpoint.layout import read_dcp_metadata

    out = {}
    for key, item in read_dcp_metadata(ckpt_dir).items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            out[key[len("model."):]] = (item.size, item.properties.dtype)
    return out


def read_checkpoint_model_state(ckpt_dir: str | os.PathLike, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model tensors of a neoxt checkpoint, checked against ``cfg`` (names and shapes), on CPU."""
    from neoxt.checkpoint.layout import load_state
    from neoxt.model.shapes import parameter_shapes

    saved = saved_model_tensors(ckpt_dir)
    want = parameter_shapes(cfg)
    missing = sorted(set(want) - set(saved))
    if missing:
        raise CheckpointError(f"{ckpt_dir}: checkpoint has no tensor model.{missing[0]} that its config.yml requires"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in want.items():
        if saved[name][0] != shape:
            raise CheckpointError(f"{ckpt_dir}: tensor model.{name} has shape {list(saved[name][0])} but its "
                                  f"config.yml implies {list(shape)}")
    sd = {name: torch.empty(want[name], dtype=saved[name][1]) for name in want}
    load_state(ckpt_dir, {"model": sd})
    return sd


def _build(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], device, dtype):
    from neoxt.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(dict(sd), strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None):
    """A neoxt run dir, ``global_step<N>`` dir or HF model dir → our ``Transformer`` (eval mode).

    ``dtype`` may be a torch dtype or a name ("bf16", "float32", ...); None keeps the stored dtype.
    """
    from neoxt.checkpoint.layout import is_checkpoint_dir, resolve_checkpoint

    if isinstance(dtype, str):
        dtype = dtype_of(dtype)
    p = Path(path)
    if is_hf_model_dir(p) and not is_checkpoint_dir(p):
        cfg, sd, _, _ = read_hf_model(p)
        return _build(cfg, sd, device, dtype)
    ckpt = resolve_checkpoint(p)
    try:
        cfg = read_checkpoint_config(ckpt).model
    except ConfigError as err:
        raise CheckpointError(f"{ckpt}/config.yml: {err}") from err
    sd = read_checkpoint_model_state(ckpt, cfg)
    return _build(cfg, sd, device, dtype)
