"""Merge GPT-NeoX-style YAML files into one resolved ``RunConfig``.

The order of work: read and merge the files and ``--set`` overrides (``files.py``: GPT-NeoX's
spelling and merge rules), then resolve: every plain key lands in its dataclass field with a type check,
and the derived values (batch triple, warmup, MLP width, per-layer attention) are computed once.
Every error names the file (and line) and the key.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from neoxt.config import neox_keys, ranges
from neoxt.config.coerce import coerce
from neoxt.config.files import Entry, merge_entries, normalize_key, read_config_file
from neoxt.config.mlp import MlpWidths, fork_widths, mamba_width, upstream_widths
from neoxt.config.schema import SECTIONS, RunConfig
from neoxt.errors import ConfigError

log = logging.getLogger("neoxt.config")


def load_config(
    paths: Sequence[str | Path], overrides: Sequence[str] = (), world_size: int | None = None
) -> RunConfig:
    """Load and merge GPT-NeoX-style YAML files (plus ``--set key=value`` overrides).

    ``world_size`` (default: ``$WORLD_SIZE`` or 1) fixes the data-parallel size used to derive the
    global batch.
    """
    merged = merge_entries((read_config_file(p) for p in paths), overrides)
    return resolve(merged, tuple(str(p) for p in paths), world_size)


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>", world_size: int | None = None) -> RunConfig:
    """Build a RunConfig from a dict written with the same keys as a YAML file."""
    entries = {normalize_key(k): Entry(v, source, str(k)) for k, v in data.items()}
    return resolve(entries, (), world_size)


# --------------------------------------------------------------------------------------------------
# Resolution


def _field_index() -> dict[str, tuple[str, type]]:
    """field name -> (section, dataclass) for every plain field of every section."""
    index: dict[str, tuple[str, type]] = {}
    for section in SECTIONS:
        cls = _section_class(section)
        for f in fields(cls):
            index[f.name] = (section, cls)
    return index


def _section_class(section: str) -> type:
    hints = typing.get_type_hints(RunConfig)
    return hints[section]


_FIELDS = _field_index()
KNOWN_KEYS: frozenset[str] = frozenset(
    set(_FIELDS) | set(neox_keys.ALIASES) | neox_keys.STRUCTURED | neox_keys.IGNORED | set(neox_keys.UNSUPPORTED)
)
# Derived fields a user does not write directly (they come from structured keys).
_DERIVED_FIELDS = frozenset(
    {"attention_types", "warmup_iters", "optimizer_type", "betas", "eps", "momentum", "data_parallel_size"}
)


def _where(entry: Entry, key: str) -> str:
    return f"{entry.source}: {key}"


class _Resolver:
    """Resolves merged entries into section dicts; one instance per load."""

    def __init__(self, entries: dict[str, Entry]):
        self.entries = entries
        self.values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        self.hints = {s: typing.get_type_hints(_section_class(s)) for s in SECTIONS}

    def has(self, key: str) -> bool:
        return key in self.entries and self.entries[key].value is not None

    def get(self, key: str, tp: Any, default: Any = None) -> Any:
        if key not in self.entries or self.entries[key].value is None:
            return default
        entry = self.entries[key]
        return coerce(entry.value, tp, _where(entry, entry.spelling))

    def src(self, key: str) -> str:
        return self.entries[key].source.rsplit(":", 1)[0] if key in self.entries else "default"

    def set(self, section: str, name: str, value: Any, key: str | None = None) -> None:
        tp = self.hints[section][name]
        where = _where(self.entries[key], self.entries[key].spelling) if key in self.entries else name
        self.values[section][name] = coerce(value, tp, where)


def resolve(entries: dict[str, Entry], sources: tuple[str, ...], world_size: int | None = None) -> RunConfig:
    r = _Resolver(entries)
    ranges.check_entries(entries)  # before anything divides by a value
    ignored: list[str] = []
    for key, entry in entries.items():
        if key in neox_keys.IGNORED:
            ignored.append(entry.spelling)
        elif key in neox_keys.UNSUPPORTED:
            default = neox_keys.UNSUPPORTED[key]
            if entry.value is not None and entry.value != default:
                raise ConfigError(
                    f"{_where(entry, entry.spelling)}: {entry.value!r} is not supported by neoxt "
                    f"(only the GPT-NeoX default {default!r} is accepted)"
                )
        elif key in neox_keys.STRUCTURED:
            continue
        elif key in neox_keys.ALIASES:
            section, name = neox_keys.ALIASES[key]
            other = next((k for k, v in neox_keys.ALIASES.items() if v == (section, name) and k != key), None)
            if name in entries:
                raise ConfigError(
                    f"{entry.source}: '{entry.spelling}' and '{entries[name].spelling}' "
                    f"({entries[name].source}) set the same thing; keep one"
                )
            del other
            if entry.value is not None:
                r.set(section, name, entry.value, key)
        elif key in _FIELDS and key not in _DERIVED_FIELDS:
            section, _ = _FIELDS[key]
            if entry.value is None:
                hint = r.hints[section][key]
                if type(None) not in typing.get_args(hint):
                    continue  # null means "default" for keys that cannot be null
            r.set(section, key, entry.value, key)
        else:
            raise ConfigError(_unknown_key_message(entry))
    if ignored:
        log.warning(
            "config: ignoring %d GPT-NeoX key(s) that only tune DeepSpeed/fused kernels/launchers: %s",
            len(ignored),
            ", ".join(sorted(ignored)),
        )

    _resolve_precision(r)
    _resolve_optimizer(r)
    _resolve_model(r)
    _resolve_data(r)
    _resolve_batch(r, world_size)
    _resolve_schedule(r)
    _check_consistency(r)

    sections = {s: _section_class(s)(**r.values[s]) for s in SECTIONS}
    nested_source = r.src("optimizer") if "optimizer" in entries else ", ".join(sources) or "default"
    ranges.check_sections(sections, lambda key: r.src(key) if key in entries else nested_source)
    return RunConfig(**sections, source_files=sources)


def _unknown_key_message(entry: Entry) -> str:
    key = normalize_key(entry.spelling)
    close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    file = entry.source.rsplit(":", 1)[0] if entry.source not in ("--set", "<dict>") else entry.source
    return f"config error: {file}: unknown key '{entry.spelling}'{hint}"


def _resolve_precision(r: _Resolver) -> None:
    enabled: dict[str, str] = {}
    for key in ("fp16", "bf16"):
        if not r.has(key):
            continue
        block = r.entries[key].value
        if not isinstance(block, dict):
            raise ConfigError(f"{_where(r.entries[key], key)}: expected a block like {{enabled: true}}")
        if block.get("enabled", False):
            enabled[key] = r.src(key)
        if key == "fp16":
            mapping = {
                "loss_scale": "loss_scale",
                "initial_scale_power": "initial_scale_power",
                "loss_scale_window": "loss_scale_window",
                "hysteresis": "hysteresis",
                "min_loss_scale": "min_loss_scale",
            }
            for sub, name in mapping.items():
                if sub in block:
                    r.set("training", name, block[sub], key)
            unknown = set(block) - set(mapping) - {"enabled", "fp16", "type", "auto_cast"}
            if unknown:
                raise ConfigError(f"{_where(r.entries[key], key)}: unknown key '{sorted(unknown)[0]}' in the fp16 block")
    if len(enabled) > 1:
        raise ConfigError(
            f"fp16.enabled ({enabled['fp16']}) and bf16.enabled ({enabled['bf16']}) are both true; pick one"
        )
    from_blocks = "fp16" if "fp16" in enabled else "bf16" if "bf16" in enabled else None
    precision = None
    if r.has("precision"):
        entry = r.entries["precision"]
        name = str(entry.value).lower()
        if name not in neox_keys.PRECISION_NAMES:
            raise ConfigError(f"{_where(entry, 'precision')}: expected one of fp32, fp16, bfloat16, got {entry.value!r}")
        precision = neox_keys.PRECISION_NAMES[name]
        if from_blocks and precision != from_blocks:
            raise ConfigError(
                f"precision: {entry.value!r} ({r.src('precision')}) contradicts "
                f"{from_blocks}.enabled: true ({enabled[from_blocks]})"
            )
    r.values["training"]["precision"] = precision or from_blocks or "fp32"


def _resolve_optimizer(r: _Resolver) -> None:
    lr_keys: dict[str, tuple[float, str]] = {}
    if r.has("optimizer"):
        entry = r.entries["optimizer"]
        block = entry.value
        if not isinstance(block, dict):
            raise ConfigError(f"{_where(entry, 'optimizer')}: expected a block {{type: ..., params: {{...}}}}")
        unknown = set(block) - {"type", "params"}
        if unknown:
            raise ConfigError(f"{_where(entry, 'optimizer')}: unknown key '{sorted(unknown)[0]}' in the optimizer block")
        kind = str(block.get("type", "adam"))
        if kind.lower() not in neox_keys.OPTIMIZER_TYPES:
            raise ConfigError(
                f"{_where(entry, 'optimizer.type')}: unsupported optimizer {kind!r} "
                f"(supported: {', '.join(sorted(set(neox_keys.OPTIMIZER_TYPES)))})"
            )
        r.values["optimizer"]["optimizer_type"] = neox_keys.OPTIMIZER_TYPES[kind.lower()]
        params = block.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{_where(entry, 'optimizer.params')}: expected a mapping")
        for name, value in params.items():
            if name not in neox_keys.OPTIMIZER_PARAMS:
                raise ConfigError(
                    f"{_where(entry, 'optimizer.params')}: unknown optimizer parameter '{name}' "
                    f"(known: {', '.join(sorted(neox_keys.OPTIMIZER_PARAMS))})"
                )
            if name == "lr":
                lr_keys["optimizer.params.lr"] = (coerce(value, float, _where(entry, "optimizer.params.lr")), r.src("optimizer"))
            elif name == "weight_decay" and r.has("weight_decay"):
                raise ConfigError(
                    f"optimizer.params.weight_decay ({r.src('optimizer')}) and weight_decay ({r.src('weight_decay')}) "
                    "are both set; keep one"
                )
            else:
                tp = r.hints["optimizer"][name]
                r.values["optimizer"][name] = coerce(value, tp, _where(entry, f"optimizer.params.{name}"))
    if r.has("lr"):
        lr_keys["lr"] = (r.get("lr", float), r.src("lr"))
    if len(lr_keys) == 2 and lr_keys["lr"][0] != lr_keys["optimizer.params.lr"][0]:
        (a, (va, sa)), (b, (vb, sb)) = lr_keys.items()
        raise ConfigError(f"{a} = {va} ({sa}) contradicts {b} = {vb} ({sb})")
    if lr_keys:
        r.values["optimizer"]["lr"] = next(iter(lr_keys.values()))[0]


def _resolve_model(r: _Resolver) -> None:
    m = r.values["model"]
    hidden = m.get("hidden_size", 64)
    heads = m.get("num_attention_heads", 4)
    layers = m.get("num_layers", 2)
    m["attention_types"] = _attention_types(r, layers)
    if r.values["training"].get("train_impl") == "rm" and not r.has("value_head"):
        m["value_head"] = True  # GPT-NeoX's is_rm: the reward model's output layer is one scalar
    attention = any(t not in neox_keys.MAMBA_ATTENTION_NAMES for t in m["attention_types"])
    if m.get("mamba_d_inner") is None and set(m["attention_types"]) & neox_keys.MAMBA_ATTENTION_NAMES:
        m["mamba_d_inner"] = mamba_width(hidden, attention, r.get("intermediate_size", int),
                                         r.get("expansion_factor", float), m.get("mamba_expand", 2))
    if attention and hidden % heads:
        raise ConfigError(
            f"hidden_size = {hidden} ({r.src('hidden_size')}) is not divisible by "
            f"num_attention_heads = {heads} ({r.src('num_attention_heads')})"
        )
    kv = r.get("num_kv_heads", int, heads)
    if attention and heads % kv:
        raise ConfigError(
            f"num_attention_heads = {heads} ({r.src('num_attention_heads')}) is not divisible by "
            f"num_kv_heads = {kv} ({r.src('num_kv_heads')})"
        )
    m["num_kv_heads"] = kv
    m["intermediate_size"] = _mlp_width(r, hidden)

    seq = r.get("seq_length", int, 2048)
    r.values["data"]["seq_length"] = seq
    max_pos = r.get("max_position_embeddings", int, seq)
    if max_pos < seq:
        raise ConfigError(
            f"max_position_embeddings = {max_pos} ({r.src('max_position_embeddings')}) is smaller than "
            f"seq_length = {seq} ({r.src('seq_length')})"
        )
    m["max_position_embeddings"] = max_pos

    if "sliding" in m["attention_types"] and not m.get("sliding_window_width"):
        raise ConfigError(
            f"attention_config ({r.src('attention_config')}) has sliding-window layers but "
            "sliding_window_width is not set"
        )
    placement = m.get("norm_placement", "pre")
    if placement == "olmo3" and m.get("gpt_j_residual"):
        raise ConfigError(
            f"norm_placement: olmo3 ({r.src('norm_placement')}) contradicts gpt_j_residual: true "
            f"({r.src('gpt_j_residual')})"
        )
    if m.get("use_qk_layernorm") and m.get("use_separate_qk_norms"):
        m["use_qk_layernorm"] = False  # the OLMo-3 fork's configs set both: separate norms take precedence
    if m.get("moe_num_experts", 1) > 1 and m.get("moe_top_k", 1) == 1 and m.get("moe_router_type") != "topk":
        m.setdefault("moe_score_func", "sigmoid")  # upstream's SinkhornRouter: sigmoid(logit) at top 1


def _mlp_width(r: _Resolver, hidden: int) -> int:
    """Each branch's MLP width (the whole hidden width when not gated), as the fork sizes it (``mlp.py``)."""
    gated = r.values["model"].get("activation", "gelu") in ("swiglu", "geglu", "reglu")
    multiple = r.get("mlp_multiple_of", int, 1)
    if multiple < 1:
        raise ConfigError(f"{_where(r.entries['mlp_multiple_of'], 'mlp_multiple_of')}: must be at least 1")
    explicit = r.get("intermediate_size", int)
    factor = r.get("expansion_factor", float)
    if explicit is not None and factor is not None:
        raise ConfigError(
            f"intermediate_size ({r.src('intermediate_size')}) and expansion_factor ({r.src('expansion_factor')}) "
            "are both set; GPT-NeoX takes one or the other"
        )
    widths = fork_widths(hidden, gated, explicit, factor, multiple)
    upstream = upstream_widths(hidden, gated, explicit, factor, multiple)
    if not widths.buildable:
        raise ConfigError(
            f"MLP width: GPT-NeoX sizes linear1 to {widths.linear1} but linear2 to {widths.linear2} for hidden_size "
            f"{hidden} with mlp_multiple_of = {multiple} ({r.src('mlp_multiple_of')}), so it cannot run this model; "
            "set intermediate_size (each branch's width) or another mlp_multiple_of"
        )
    if explicit is not None and upstream != widths:
        _warn_upstream_width(r, explicit, upstream)
    return widths.linear2


def _warn_upstream_width(r: _Resolver, explicit: int, upstream: MlpWidths) -> None:
    """One line when upstream GPT-NeoX would build another width from the same file."""
    where = r.src("intermediate_size")
    mine = f"config: {where}: intermediate_size = {explicit} is each MLP branch's width here (the fork's and HF's convention)"
    if upstream.buildable:
        log.warning(
            "%s; upstream GPT-NeoX would build a width of %d from it (x2/3 for gated activations, rounded to "
            "mlp_multiple_of). If the file was written for upstream, set intermediate_size: %d",
            mine, upstream.linear2, upstream.linear2,
        )
    else:
        log.warning(
            "%s; upstream GPT-NeoX would size linear1 %d but linear2 %d from it, which it cannot run",
            mine, upstream.linear1, upstream.linear2,
        )


def _attention_types(r: _Resolver, layers: int) -> tuple[str, ...]:
    if r.has("attention_types"):
        raw = r.get("attention_types", tuple[str, ...])
        types_ = [_attention_name(r, "attention_types", t) for t in raw]
    elif r.has("attention_config"):
        # GPT-NeoX: [[pattern, n], ...] repeats each pattern n times (n may be "all"); a flat list of
        # strings is already one type per layer.
        entry = r.entries["attention_config"]
        spec = entry.value
        if not isinstance(spec, list):
            raise ConfigError(f"{_where(entry, 'attention_config')}: expected a list like [[[\"global\"], {layers}]]")
        if _is_one_run(spec):
            spec = [spec]  # the fork's neox_config.json writes one run unwrapped: [["flash"], 32]
        types_ = []
        if all(isinstance(item, str) for item in spec):
            types_ = [_attention_name(r, "attention_config", n) for n in spec]
        for item in spec if not types_ else ():
            ok = isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)
            count = item[1] if ok else None
            if count == "all" and item[0] and layers % len(item[0]) == 0:
                count = layers // len(item[0])
            if not ok or isinstance(count, bool) or not isinstance(count, int):
                raise ConfigError(
                    f"{_where(entry, 'attention_config')}: expected entries like [[\"global\", \"sliding\"], N], got {item!r}"
                )
            types_.extend([_attention_name(r, "attention_config", n) for n in item[0]] * count)
    else:
        return ("global",) * layers
    if len(types_) != layers:
        raise ConfigError(
            f"{r.src('attention_config' if r.has('attention_config') else 'attention_types')}: attention layer types "
            f"cover {len(types_)} layers but num_layers = {layers} ({r.src('num_layers')})"
        )
    return tuple(types_)


def _is_one_run(spec: list) -> bool:
    """``[[names...], count]``: one run of a pattern, written without the outer list."""
    return (
        len(spec) == 2 and isinstance(spec[0], list) and all(isinstance(n, str) for n in spec[0])
        and (spec[1] == "all" or (isinstance(spec[1], int) and not isinstance(spec[1], bool)))
    )


def _attention_name(r: _Resolver, key: str, name: Any) -> str:
    if isinstance(name, str):
        low = name.lower()
        if low == "flash" and r.values["model"].get("sliding_window_width"):
            # GPT-NeoX applies sliding_window_width to every flash-attention layer.
            return "sliding"
        if low in neox_keys.GLOBAL_ATTENTION_NAMES:
            return "global"
        if low in neox_keys.SLIDING_ATTENTION_NAMES:
            return "sliding"
        if low in neox_keys.MAMBA_ATTENTION_NAMES:
            return low
    raise ConfigError(
        f"{_where(r.entries[key], key)}: attention type {name!r} is not supported "
        "(supported: global, flash, sliding/local, mamba, mamba2)"
    )


def _resolve_data(r: _Resolver) -> None:
    d = r.values["data"]
    if r.has("data_impl"):
        entry = r.entries["data_impl"]
        if str(entry.value).lower() not in ("mmap", "infer"):
            raise ConfigError(f"{_where(entry, 'data_impl')}: only 'mmap' datasets are supported, got {entry.value!r}")
    if d.get("data_path") and d.get("train_data_paths"):
        raise ConfigError(
            f"data_path ({r.src('data_path')}) and train_data_paths ({r.src('train_data_paths')}) are both set; "
            "use one (data_path is split by `split`; train/valid/test_data_paths are explicit)"
        )
    for split in ("train", "valid", "test"):
        paths = d.get(f"{split}_data_paths", ())
        wkey = f"{split}_data_weights"
        if r.has(wkey):
            weights = r.get(wkey, tuple[float, ...])
            if paths and len(weights) != len(paths):
                raise ConfigError(
                    f"{wkey} ({r.src(wkey)}) has {len(weights)} weights but {split}_data_paths "
                    f"({r.src(f'{split}_data_paths')}) has {len(paths)} paths"
                )
            if any(w < 0 for w in weights):
                raise ConfigError(f"{_where(r.entries[wkey], wkey)}: weights must be non-negative")
            d[wkey] = weights
        elif paths:
            d[wkey] = (1.0,) * len(paths)
        for kind in ("label", "reward"):
            key = f"{split}_{kind}_data_paths"
            extra = d.get(key, ())
            if extra and len(extra) != len(paths):
                raise ConfigError(
                    f"{key} ({r.src(key)}) has {len(extra)} paths but {split}_data_paths "
                    f"({r.src(f'{split}_data_paths')}) has {len(paths)}"
                )
            if extra and not paths:
                raise ConfigError(f"{key} ({r.src(key)}) needs {split}_data_paths as well")


def _resolve_batch(r: _Resolver, world_size: int | None) -> None:
    t = r.values["training"]
    p = r.values["parallelism"]
    # Context-parallel ranks share their batches like tensor-parallel ones: not data-parallel for batch sizes.
    model_parallel = (max(p.get("model_parallel_size", 1), 1) * max(p.get("pipe_parallel_size", 0), 1)
                      * max(p.get("context_parallel_size", 1), 1))
    if world_size is None:
        # Outside a launched job (e.g. `neoxt config`), assume the smallest world the config fits.
        world_size = int(os.environ.get("WORLD_SIZE", model_parallel))
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by model_parallel_size × pipe_parallel_size × "
            f"context_parallel_size = {model_parallel}"
        )
    dp = world_size // model_parallel
    micro = r.get("train_micro_batch_size_per_gpu", int)
    if micro is None and "train_micro_batch_size_per_gpu" in t:
        micro = t["train_micro_batch_size_per_gpu"]  # set through the batch_size alias
    accum = r.get("gradient_accumulation_steps", int)
    total = r.get("train_batch_size", int)
    names = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"
    if total is not None and micro is not None and accum is not None:
        if total != micro * accum * dp:
            raise ConfigError(
                f"train_batch_size = {total} ({r.src(names[0])}) contradicts train_micro_batch_size_per_gpu = "
                f"{micro} ({r.src(names[1])}) × gradient_accumulation_steps = {accum} ({r.src(names[2])}) × "
                f"data-parallel size {dp}"
            )
    elif total is not None and micro is not None:
        if total % (micro * dp):
            raise ConfigError(
                f"train_batch_size = {total} ({r.src(names[0])}) is not a multiple of train_micro_batch_size_per_gpu "
                f"= {micro} ({r.src(names[1])}) × data-parallel size {dp}"
            )
        accum = total // (micro * dp)
    elif total is not None and accum is not None:
        if total % (accum * dp):
            raise ConfigError(
                f"train_batch_size = {total} ({r.src(names[0])}) is not a multiple of gradient_accumulation_steps "
                f"= {accum} ({r.src(names[2])}) × data-parallel size {dp}"
            )
        micro = total // (accum * dp)
    elif total is not None:
        accum = 1
        if total % dp:
            raise ConfigError(f"train_batch_size = {total} ({r.src(names[0])}) is not divisible by data-parallel size {dp}")
        micro = total // dp
    micro = 1 if micro is None else micro
    accum = 1 if accum is None else accum
    for name, value in ((names[1], micro), (names[2], accum)):
        if value < 1:
            raise ConfigError(f"{name} = {value} ({r.src(name)}) must be at least 1")
    t["train_micro_batch_size_per_gpu"] = micro
    t["gradient_accumulation_steps"] = accum
    t["train_batch_size"] = micro * accum * dp
    t["data_parallel_size"] = dp


def _resolve_schedule(r: _Resolver) -> None:
    s = r.values["schedule"]
    train_iters = r.get("train_iters", int, 0)
    r.values["training"]["train_iters"] = train_iters
    if r.has("lr_decay_iters") and r.has("lr_decay_fraction"):
        raise ConfigError(
            f"lr_decay_iters ({r.src('lr_decay_iters')}) and lr_decay_fraction ({r.src('lr_decay_fraction')}) "
            "are both set; keep one"
        )
    if r.has("lr_decay_iters"):
        decay = r.get("lr_decay_iters", int)
    elif r.has("lr_decay_fraction"):
        decay = int(math.floor(train_iters * r.get("lr_decay_fraction", float)))
    else:
        decay = train_iters
    s["lr_decay_iters"] = decay
    if r.has("warmup") and r.has("warmup_iters"):
        raise ConfigError(f"warmup ({r.src('warmup')}) and warmup_iters ({r.src('warmup_iters')}) are both set; keep one")
    s["warmup_iters"] = _warmup_iters(r, decay)
    lr = r.values["optimizer"].get("lr", 6e-4)
    if r.has("decay_lr_to"):
        s["min_lr"] = _decay_lr_to(r, lr)
    min_lr = s.get("min_lr", 0.0)
    if min_lr > lr:
        raise ConfigError(f"min_lr = {min_lr} ({r.src('min_lr')}) is larger than lr = {lr}")


def _warmup_iters(r: _Resolver, decay: int) -> float:
    """Warmup in (possibly fractional) iterations.

    GPT-NeoX: ``warmup`` (default 0.01) times the decay iterations, kept as a float, so 0.01 of 150
    iterations warms up over 1.5 (the first step at lr/1.5). neoxt's ``warmup_iters`` gives the
    number directly, and a ``warmup`` above 1 (a whole multiple of the run under upstream's reading)
    is read as iterations, with a warning.
    """
    if r.has("warmup_iters"):
        value = r.get("warmup_iters", float)
        if value < 0:
            raise ConfigError(f"{_where(r.entries['warmup_iters'], 'warmup_iters')}: must be non-negative")
        return value
    warmup = r.get("warmup", float, 0.01)
    if warmup < 0:
        raise ConfigError(f"{_where(r.entries['warmup'], 'warmup')}: must be non-negative")
    if warmup <= 1:
        return warmup * max(1, decay)
    log.warning(
        "config: %s: warmup = %s is read as %s iterations (GPT-NeoX reads warmup as a fraction of the decay "
        "iterations; write warmup_iters to say iterations)", r.src("warmup"), warmup, warmup,
    )
    return warmup


def _decay_lr_to(r: _Resolver, lr: float) -> float:
    """``decay_lr_to``: the schedule's end as a fraction of ``lr``, i.e. ``min_lr = decay_lr_to · lr``.

    Upstream's own configs use it (``configs/llemma/7B.yml``: 0.033, the 1/30 of the Llemma paper,
    written as ``min_lr = 0.033·lr`` in its 34B sibling) although upstream's argument parser has no
    such field and refuses the file; neoxt reads it as that file means it.
    """
    entry = r.entries["decay_lr_to"]
    fraction = r.get("decay_lr_to", float)
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"{_where(entry, entry.spelling)}: expected a fraction of lr between 0 and 1, got {fraction}")
    if r.has("min_lr"):
        raise ConfigError(
            f"decay_lr_to ({r.src('decay_lr_to')}) and min_lr ({r.src('min_lr')}) both set the final learning rate; "
            "keep one"
        )
    return fraction * lr


def _check_consistency(r: _Resolver) -> None:
    impl = r.values["training"].get("train_impl", "normal")
    if r.values["data"].get("dataset_impl") == "online" and impl != "reinforce":
        raise ConfigError(f"dataset_impl: online ({r.src('dataset_impl')}) is for train_impl: reinforce, not '{impl}'")
    c = r.values["checkpoint"]
    if c.get("finetune") and not c.get("load"):
        # Not an error at config time: a job may give the checkpoint on its command line.
        log.info("config: finetune is set without load")


def with_overrides(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """Return ``cfg`` with some section fields replaced, e.g. ``with_overrides(cfg, model={...})``."""
    return replace(cfg, **{name: replace(getattr(cfg, name), **values) for name, values in sections.items()})
