"""Where REINFORCE's rewards come from (``reinforce_reward``), one callable for all three sources.

- ``module:function`` — a Python function, imported by name (only the module the user names), called
  as TRL calls reward functions: ``fn(prompts=[str], completions=[str], prompt_ids=[[int]],
  completion_ids=[[int]])`` returning one float per completion (accept ``**kwargs`` for the rest);
- ``http://...`` / ``https://...`` — an endpoint that receives ``{"prompts": [...], "completions":
  [...]}`` as a JSON POST and answers ``{"rewards": [...]}`` (or a bare list);
- anything else — a reward-model checkpoint (``train_impl: rm``; a neoxt run or ``global_step``
  directory) that shares the policy's tokenizer; each completion is scored after its prompt
  (``neoxt.model.value_head``).

Text is the completion decoded without its EOD token; a wrong count or a non-number is an error.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neoxt.errors import ConfigError, DataError

_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Samples:
    """The completions of one sampling round, as token ids and as text."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # without the EOD token
    prompts: list[str]
    completions: list[str]


Reward = Callable[[Samples], list[float]]


def _checked(values: Any, n: int, source: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise DataError(f"reinforce_reward {source}: expected a list of numbers, got {str(values)[:80]!r}") from err
    if len(out) != n:
        raise DataError(f"reinforce_reward {source}: returned {len(out)} rewards for {n} completions")
    if not all(math.isfinite(v) for v in out):
        raise DataError(f"reinforce_reward {source}: returned a non-finite reward")
    return out


def python_reward(spec: str) -> Reward:
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reinforce_reward: cannot load '{spec}': {err}") from err

    def reward(s: Samples) -> list[float]:
        values = fn(prompts=s.prompts, completions=s.completions, prompt_ids=s.prompt_ids,
                    completion_ids=s.completion_ids)
        return _checked(values, len(s.completions), spec)

    return reward


def http_reward(url: str, timeout_s: float = 120.0) -> Reward:
    def reward(s: Samples) -> list[float]:
        body = json.dumps({"prompts": s.prompts, "completions": s.completions}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                answer = json.loads(response.read().decode())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
            raise DataError(f"reinforce_reward {url}: no usable answer ({err})") from err
        values = answer.get("rewards") if isinstance(answer, dict) else answer
        return _checked(values, len(s.completions), url)

    return reward


def model_reward(path: str, device: torch.device) -> Reward:
    from neoxt.checkpoint import load_model
    from neoxt.model.value_head import score_sequences

    model = load_model(path, device=device)
    if not model.cfg.value_head:
        raise ConfigError(f"reinforce_reward: {path} is not a reward model (no value head; train one with train_impl: rm)")

    def reward(s: Samples) -> list[float]:
        return score_sequences(model, [p + c for p, c in zip(s.prompt_ids, s.completion_ids)])

    return reward


def build_reward(spec: str | None, device: torch.device) -> Reward:
    """The reward ``reinforce_reward`` names (see the module docstring)."""
    if not spec:
        raise ConfigError("train_impl: reinforce needs reinforce_reward (module:function, a reward-model "
                          "checkpoint, or an http(s):// endpoint)")
    if spec.startswith(("http://", "https://")):
        return http_reward(spec)
    if _FUNCTION.match(spec):
        return python_reward(spec)
    return model_reward(spec, device)


def leave_one_out(rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """RLOO advantages: each reward minus the mean of the other samples of its prompt.

    ``rewards`` [prompts x samples] flattened prompt-major (a prompt's samples are adjacent)."""
    grouped = rewards.view(-1, samples)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (samples - 1)
    return (grouped - others).reshape(-1)


def decode_all(tokenizer: Any, seqs: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(list(s)) for s in seqs]
