"""Write a RunConfig back as YAML with GPT-NeoX key names.

``load_config`` of the output gives back an equal RunConfig (for the same world size): derived
values are written in the form that resolves to themselves (explicit ``intermediate_size``,
``warmup_iters``, ``attention_config`` run-length encoded, the ``optimizer`` block).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import yaml

from neoxt.config.schema import MAMBA_TYPES, SECTIONS, RunConfig

# Fields written in another form (or not at all: they are re-derived on load).
_SPECIAL = {
    "optimizer": {"optimizer_type", "lr", "betas", "eps", "momentum"},
    "model": {"attention_types"},
    "training": {"train_batch_size", "data_parallel_size", "precision"},
    "schedule": set(),
}
_PRECISION_OUT = {"fp32": "fp32", "fp16": "fp16", "bf16": "bfloat16"}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _attention_config(types: tuple[str, ...]) -> list:
    runs: list[list] = []
    for t in types:
        if runs and runs[-1][0] == [t]:
            runs[-1][1] += 1
        else:
            runs.append([[t], 1])
    return runs


def _has_mamba(cfg: RunConfig) -> bool:
    return bool(set(cfg.model.attention_types) & MAMBA_TYPES)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as one flat dict of GPT-NeoX keys (sections in order)."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        skip = _SPECIAL.get(section, set())
        for f in fields(obj):
            if f.name in skip or (section == "model" and f.name.startswith("mamba_") and not _has_mamba(cfg)):
                continue  # (Mamba keys only when some layer is a Mamba block: they are defaults otherwise)
            out[f.name] = _plain(getattr(obj, f.name))
        if section == "model":
            out["attention_config"] = _attention_config(cfg.model.attention_types)
        elif section == "optimizer":
            o = cfg.optimizer
            params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps}
            if o.momentum:
                params["momentum"] = o.momentum
            out["optimizer"] = {"type": o.optimizer_type, "params": params}
        elif section == "training":
            out["precision"] = _PRECISION_OUT[cfg.training.precision]
    return out


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


# Model fields a training config commonly sets itself (initialisation, dropout): left out of the
# model-only snippet so it merges with such a config.
_NOT_ARCHITECTURE = frozenset(
    {"init_method", "output_layer_init_method", "init_method_std", "attention_dropout", "hidden_dropout"}
)


def model_only_dict(cfg: RunConfig) -> dict[str, Any]:
    """The architecture alone, as GPT-NeoX keys: what a converter writes as ``neox_config.yml``.

    Like the fork's ``neox_config.json``, it holds only what fixes the weights' shapes and the
    model's function, so ``neoxt train neox_config.yml sft.yml`` merges without a key set twice
    (a full ``config.yml`` would clash on ``optimizer``, ``train_iters``, ...). ``padded_vocab_size``
    replaces ``make_vocab_size_divisible_by`` once the vocabulary is known.
    """
    m = cfg.model
    out: dict[str, Any] = {}
    for f in fields(m):
        if f.name in _NOT_ARCHITECTURE or f.name == "attention_types":
            continue
        if f.name == "padded_vocab_size" and m.padded_vocab_size is None:
            continue
        if f.name == "make_vocab_size_divisible_by" and m.padded_vocab_size is not None:
            continue
        out[f.name] = _plain(getattr(m, f.name))
    out["attention_config"] = _attention_config(m.attention_types)
    return out


def model_only_yaml(cfg: RunConfig) -> str:
    header = "# Model architecture only (neoxt): merge with a training config, e.g. neoxt train neox_config.yml sft.yml\n"
    return header + yaml.safe_dump(model_only_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


def asdict_config(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict (section -> fields), e.g. for metrics/W&B config logging."""
    return asdict(cfg)
