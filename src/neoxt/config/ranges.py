"""Value ranges: a number the model or the loop cannot use is a config error naming its key and file.

Without these, ``num_attention_heads: 0`` ended in a ZeroDivisionError, ``hidden_size: 0`` in an error
blaming ``rotary_pct``, ``lr: .nan`` trained NaN, ``train_iters: 1e18`` overflowed later. Checked twice:
on the entries as written (before anything divides by them) and on the resolved sections (values
that arrive through nested blocks such as ``optimizer.params.lr``, or derived ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from neoxt.errors import ConfigError

INF = math.inf
# key → (lowest, highest), both allowed. The upper bounds are far past any real run; beyond them a
# value is a typo (1e30) that would overflow a tensor size or an int64 counter.
RANGES: dict[str, tuple[float, float]] = {
    "num_layers": (1, 100_000), "hidden_size": (1, 1 << 20), "num_attention_heads": (1, 1 << 16),
    "num_kv_heads": (1, 1 << 16), "intermediate_size": (1, 1 << 24), "max_position_embeddings": (1, 1 << 26),
    "seq_length": (1, 1 << 26), "padded_vocab_size": (1, (1 << 31) - 1), "make_vocab_size_divisible_by": (1, 1 << 20),
    "sliding_window_width": (1, 1 << 26), "mlp_multiple_of": (1, 1 << 20),
    "train_iters": (0, 10**12), "train_micro_batch_size_per_gpu": (1, 1 << 24), "gradient_accumulation_steps": (1, 1 << 24),
    "train_batch_size": (1, 1 << 30), "eval_interval": (1, 10**12), "eval_iters": (0, 10**12), "log_interval": (1, 10**12),
    "checkpoint_factor": (0, 10**12), "keep_last_n_checkpoints": (0, 10**9), "max_consecutive_nan": (1, 10**9),
    "hysteresis": (1, 10**9), "loss_scale_window": (1, 10**12), "initial_scale_power": (0, 126),
    "loss_scale": (0, 2.0**126), "min_loss_scale": (0, 2.0**126),
    "lr": (0, INF), "min_lr": (0, INF), "weight_decay": (0, 1e6), "gradient_clipping": (0, INF), "eps": (0, 1),
    "momentum": (0, 1), "warmup": (0, INF), "warmup_iters": (0, INF),
    "rotary_pct": (0, 1), "rotary_emb_base": (1e-9, INF), "layernorm_epsilon": (0, 1), "rms_norm_epsilon": (0, 1),
    "attention_dropout": (0, 0.999999), "hidden_dropout": (0, 0.999999), "init_method_std": (0, 1e6),
    "rope_scaling_factor": (1e-9, 1e6), "dist_timeout_s": (1, 10**7), "dist_startup_timeout_s": (1, 10**7),
    "step_timeout_s": (0, 10**7), "dpo_beta": (0, 1e6), "kto_beta": (0, 1e6),
}


def _problem(key: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and math.isnan(value):
        return "is not a number"
    lo, hi = RANGES.get(key, (-INF, INF))
    if isinstance(value, float) and math.isinf(value) and hi != INF:
        return "must be finite"
    if value < lo:
        return f"must be at least {_fmt(lo)}"
    if value > hi:
        return f"must be at most {_fmt(hi)}"
    return None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def check_entries(entries: Mapping[str, Any]) -> None:
    """The values as the user wrote them (``Entry`` objects with value/source/spelling)."""
    for key, entry in entries.items():
        problem = _problem(key, entry.value)
        if problem:
            raise ConfigError(f"{entry.source}: {entry.spelling} = {entry.value!r} {problem}")


def check_sections(sections: Mapping[str, Any], source_of: Callable[[str], str]) -> None:
    """The resolved section dataclasses (values that differ from the defaults); ``source_of(key)`` names
    where a key came from."""
    for name, section in sections.items():
        if not is_dataclass(section):
            continue
        for f in fields(section):
            value = getattr(section, f.name)
            if value == f.default:  # defaults are in range, or (train_iters: 0) mean "not set"
                continue
            problem = _problem(f.name, value)
            if problem:
                key = "optimizer.params.lr" if (name, f.name) == ("optimizer", "lr") else f.name
                raise ConfigError(f"{source_of(f.name)}: {key} = {value!r} {problem}")
