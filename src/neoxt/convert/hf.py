"""Hugging Face model directories ↔ neoxt run directories: what ``neoxt convert hf-to-neoxt`` and
``neoxt-to-hf`` do. The name and config mapping itself is model knowledge and lives in
``neoxt.model.hf_names``; reading an HF directory into our state dict is ``neoxt.checkpoint.loading``.

Everything is written under a hidden temporary directory beside the output and renamed into place
only when complete (``neoxt.io.temp_dir_beside`` / ``publish_dir``), so a failure leaves nothing at
the output path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from neoxt.config.schema import TokenizerConfig
from neoxt.convert.hf_tokens import ID_KEYS, apply_to_tokenizer, record_source_ids, resolve_export_tokens
from neoxt.dtypes import dtype_of, precision_of
from neoxt.errors import ConversionError
from neoxt.io import publish_dir, temp_dir_beside
from neoxt.model.hf_names import (
    HF_CLASS,
    architecture_for,
    hf_config_from_model_config,
    neoxt_to_hf_state_dict,
)
from neoxt.progress import tracker

# The model-only config snippet converters write beside config.yml (the fork's neox_config.json role).
MODEL_ONLY_CONFIG = "neox_config.yml"

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
)


def read_chat_template(value: str | None) -> str | None:
    """The template text for a TokenizerConfig.chat_template (inline Jinja text or a file path)."""
    if not value:
        return None
    if "{%" in value or "{{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConversionError(f"chat_template: {value} is neither a Jinja template nor an existing file")
    return path.read_text(encoding="utf-8")


def _hf_chat_template(hf_dir: Path) -> str | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg_path = hf_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        template = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


def _copy_tokenizer(hf_dir: Path, tmp_tok: Path, final_tok: Path) -> TokenizerConfig:
    """Copy the HF tokenizer files; return the tokenizer config pointing at their final place."""
    present = [f for f in _TOKENIZER_FILES if (hf_dir / f).is_file()]
    if not present:
        print(f"neoxt: warning: {hf_dir} has no tokenizer files; the config has no vocab_file", file=sys.stderr)
        return TokenizerConfig(tokenizer_type="HFTokenizer")
    tmp_tok.mkdir()
    for name in present:
        shutil.copy2(hf_dir / name, tmp_tok / name)
    template = _hf_chat_template(hf_dir)
    if template is not None and not (tmp_tok / "chat_template.jinja").is_file():
        (tmp_tok / "chat_template.jinja").write_text(template, encoding="utf-8")
    record_source_ids(hf_dir, tmp_tok)
    chat = str(final_tok / "chat_template.jinja") if template is not None else None
    if "tokenizer.json" in present:
        return TokenizerConfig("HFTokenizer", str(final_tok / "tokenizer.json"), None, chat)
    if "vocab.json" in present and "merges.txt" in present:
        return TokenizerConfig("GPT2BPETokenizer", str(final_tok / "vocab.json"), str(final_tok / "merges.txt"), chat)
    if "tokenizer.model" in present:
        return TokenizerConfig("SPMTokenizer", str(final_tok / "tokenizer.model"), None, chat)
    return TokenizerConfig("HFTokenizer", None, None, chat)


def default_output_dir(hf_model: str) -> Path:
    """Where ``hf-to-neoxt`` writes without ``--output-dir``: ``<name>-neoxt`` beside a local model
    directory, or in the working directory for a Hub id (``org/pythia-160m`` → ``./pythia-160m-neoxt``)."""
    path = Path(hf_model)
    if path.is_dir():
        return path.absolute().with_name(path.absolute().name + "-neoxt")
    return Path.cwd() / (str(hf_model).rstrip("/").split("/")[-1] + "-neoxt")


def convert_hf_to_neoxt(
    hf_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: str | None = None, iteration: int = 0,
    revision: str | None = None, save_tokenizer: bool = True,
) -> Path:
    """HF model directory (or Hub id) → neoxt run directory (checkpoint, config.yml, the model-only
    ``neox_config.yml`` that merges with a training config, tokenizer/ unless ``save_tokenizer`` is off).

    Returns the checkpoint (step) directory.
    """
    from neoxt.checkpoint import save_checkpoint, step_dir_name
    from neoxt.checkpoint.loading import read_hf_model, resolve_hf_source
    from neoxt.config import config_to_yaml, model_only_yaml
    from neoxt.config.schema import DataConfig, RunConfig, TrainingConfig

    hf_dir, out = resolve_hf_source(hf_dir, revision), Path(output_dir).absolute()
    torch_dtype = dtype_of(dtype) if dtype else None
    tmp = temp_dir_beside(out, ConversionError)
    try:
        cfg, sd, arch, _ = read_hf_model(hf_dir, torch_dtype, tracker(f"hf-to-neoxt {hf_dir.name}", "tensor"))
        tokenizer = _copy_tokenizer(hf_dir, tmp / "tokenizer", out / "tokenizer") if save_tokenizer \
            else TokenizerConfig(tokenizer_type="HFTokenizer")
        precision = precision_of(sd["embed.weight"].dtype)
        run_cfg = RunConfig(
            model=cfg,
            tokenizer=tokenizer,
            data=DataConfig(seq_length=min(2048, cfg.max_position_embeddings)),
            training=TrainingConfig(precision=precision),
        )
        text = config_to_yaml(run_cfg)
        meta = {"source": str(hf_dir.absolute()), "hf_architecture": HF_CLASS[arch], "consumed_tokens": 0,
                "consumed_samples": 0}
        save_checkpoint(tmp, iteration, {"model": sd}, text, meta=meta)
        (tmp / "config.yml").write_text(text, encoding="utf-8")
        (tmp / MODEL_ONLY_CONFIG).write_text(model_only_yaml(run_cfg), encoding="utf-8")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / step_dir_name(iteration)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' → bytes (decimal units as transformers' max_shard_size)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in units:
        raise ConversionError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB or 500MB)")
    return int(float(m.group(1)) * units[m.group(2)])


def write_safetensors(sd: Mapping[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[Path]:
    """HF-style (sharded) safetensors: model.safetensors, or model-0000i-of-0000n + index json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        path = out_dir / "model.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths


def _load_tokenizer(tok: TokenizerConfig):
    """A transformers tokenizer for our tokenizer config, or None when it cannot be exported."""
    from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

    if not tok.vocab_file:
        return None
    vocab = Path(tok.vocab_file)
    if not vocab.is_file():
        raise ConversionError(f"tokenizer vocab_file {vocab} (from the checkpoint's config.yml) does not exist")
    if tok.tokenizer_type == "HFTokenizer":
        if (vocab.parent / "tokenizer_config.json").is_file() and vocab.name == "tokenizer.json":
            return AutoTokenizer.from_pretrained(str(vocab.parent))
        return PreTrainedTokenizerFast(tokenizer_file=str(vocab))
    if tok.tokenizer_type in ("GPT2BPETokenizer", "HFGPT2Tokenizer") and tok.merge_file:
        return GPT2TokenizerFast(vocab_file=str(vocab), merges_file=str(tok.merge_file))
    print(f"neoxt: warning: tokenizer_type {tok.tokenizer_type} is not exported; add tokenizer files by hand",
          file=sys.stderr)
    return None


def convert_neoxt_to_hf(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, dtype: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """neoxt run dir or ``global_step<N>`` dir → HF model directory (safetensors, config, tokenizer)."""
    from neoxt.checkpoint import resolve_checkpoint
    from neoxt.checkpoint.loading import read_checkpoint_config, read_checkpoint_model_state

    out = Path(output_dir).absolute()
    ckpt = resolve_checkpoint(checkpoint)
    run_cfg = read_checkpoint_config(ckpt)
    cfg = run_cfg.model
    arch = architecture_for(cfg)
    max_bytes = parse_size(max_shard_size)
    tokenizer = _load_tokenizer(run_cfg.tokenizer)
    ids: dict = {}
    if tokenizer is not None:
        export = resolve_export_tokens(run_cfg.tokenizer, tokenizer)
        config_template = read_chat_template(run_cfg.tokenizer.chat_template)
        apply_to_tokenizer(tokenizer, replace(export, chat_template=config_template or export.chat_template))
        ids = export.ids
    # Fails on unexpressible configs before any I/O; unknown ids are None, not the config class's defaults.
    hf_cfg = hf_config_from_model_config(cfg, arch, **({k: ids.get(k) for k in ID_KEYS} if ids else {}))
    tmp = temp_dir_beside(out, ConversionError)
    try:
        sd = read_checkpoint_model_state(ckpt, cfg)
        torch_dtype = dtype_of(dtype) if dtype else None
        hf_sd = neoxt_to_hf_state_dict(sd, cfg, arch, tracker(f"neoxt-to-hf {ckpt.name}", "tensor"), torch_dtype)
        hf_cfg.dtype = str(next(iter(hf_sd.values())).dtype).removeprefix("torch.")
        write_safetensors(hf_sd, tmp, max_bytes)
        hf_cfg.save_pretrained(str(tmp))
        _write_generation_config(tmp, ids)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_generation_config(out_dir: Path, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**ids).save_pretrained(str(out_dir))
