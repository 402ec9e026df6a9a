"""Autoregressive sampling with a KV cache, and GPT-NeoX's three generation modes.

The token-level core (`generate_tokens`) batches prompts of different lengths by padding them on
the left: every row then ends at the same column, so one forward per step extends every row, the
cache advances in lock step, and the newest logits are always in the last column. Padding is hidden
from attention by ``key_padding_mask`` and skipped by per-row positions, so a padded row computes
exactly what it would alone.

Sampling follows GPT-NeoX (megatron/text_generation_utils.py): greedy when temperature, top_k and
top_p are all zero; otherwise divide by the temperature (when > 0), keep the top-k logits, then the
smallest set whose probability mass exceeds top_p (always at least one token), and draw from the
renormalised distribution. HF's TopK/TopP warpers give the same sets.

The text level (`generate_texts`) adds tokenization, the optional chat template and stop strings,
and returns GPT-NeoX's output records (context, text, length, finished, message, duration_seconds).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from neoxt.errors import ConfigError, DataError

if TYPE_CHECKING:
    from neoxt.config.schema import GenerationConfig

log = logging.getLogger(__name__)


class TextTokenizer(Protocol):
    """What generation needs from ``neoxt.tokenizer`` (or an HF tokenizer wrapped to match)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Names follow GPT-NeoX's generation keys."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    maximum_tokens: int = 64
    # Token ids that end a row (the EOD token); the stop token itself is not part of the output.
    stop_token_ids: tuple[int, ...] = ()
    # Strings that end a row once the decoded output contains one; the text is cut before it.
    stop_strings: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.top_k == 0 and self.top_p == 0.0

    def check(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.maximum_tokens < 1:
            raise ConfigError(f"maximum_tokens must be >= 1, got {self.maximum_tokens}")


@dataclass(frozen=True)
class Completion:
    """One row's result: the generated ids (stop token excluded) and why it ended."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    # True when a stop token or stop string ended the row; False when maximum_tokens ran out.
    finished: bool


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask (with -inf) every logit outside the top-k, then outside the top-p nucleus.

    Vectorised over the batch; the most likely token always survives so sampling never sees an
    all -inf row.
    """
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p > 0.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative > top_p
        # Shift right: keep the first token that crosses the threshold (and always the top one).
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from last-position logits ``[B, V]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if params.temperature > 0.0:
        logits = logits / params.temperature
    probs = F.softmax(filter_logits(logits, params.top_k, params.top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).view(-1)


def _model_config(model: torch.nn.Module):
    for name in ("cfg", "config", "model_config"):
        cfg = getattr(model, name, None)
        if cfg is not None:
            return cfg
    raise TypeError(f"{type(model).__name__} exposes no ModelConfig (.cfg/.config)")


def _new_cache(model: torch.nn.Module, batch_size: int, max_seq_len: int):
    from neoxt.model.kv_cache import KVCache

    param = next(model.parameters())
    return KVCache(_model_config(model), batch_size, max_seq_len, param.device, param.dtype)


def _left_padded(prompts: Sequence[Sequence[int]], lengths: torch.Tensor, pad_id: int, total: int):
    """(tokens [B, total] with prompts right-aligned at the current width, positions counting from
    each row's first real token, mask [B, total] True over real (non-pad) slots)."""
    width = int(lengths.max())
    device = lengths.device
    tokens = torch.full((len(prompts), total), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) : width] = torch.as_tensor(list(prompt), dtype=torch.long)
    offsets = width - lengths  # left padding per row
    columns = torch.arange(total, device=device)
    real = columns[None, :] >= offsets[:, None]
    positions = (columns[None, :] - offsets[:, None]).clamp(min=0)
    return tokens, positions, real


def _last_logits(model, tokens, positions, padding, cache, cursor: int, vocab_limit: int | None) -> torch.Tensor:
    """Logits for the next token of every row: the new slots through the KV cache, or (without a
    cache) the whole sequence again; padding rows of the vocabulary masked out."""
    mask = padding[:, :cursor] if padding is not None else None
    if cache is None:
        logits = model(tokens[:, :cursor], positions=positions[:, :cursor], key_padding_mask=mask)
    else:
        start = cache.seq_len
        logits = model(tokens[:, start:cursor], positions=positions[:, start:cursor], kv_cache=cache,
                       key_padding_mask=mask)
    last = logits[:, -1, :]
    if vocab_limit is not None and vocab_limit < last.size(-1):
        last = last.clone()
        last[:, vocab_limit:] = float("-inf")
    return last


@torch.inference_mode()
def generate_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_check: Callable[[list[int]], bool] | None = None,
    max_seq_len: int | None = None,
    vocab_limit: int | None = None,
) -> list[Completion]:
    """Generate up to ``params.maximum_tokens`` tokens after each prompt, all rows in one batch.

    ``stop_check(generated_ids)`` is asked after each new token of a row (used for stop strings);
    ``max_seq_len`` caps prompt + generation (the model's context), ending rows early when reached.
    Without ``use_cache`` every step re-runs the whole sequence (GPT-NeoX's ``recompute``), which
    must give the same tokens and exists to check the cache. ``vocab_limit`` (the tokenizer's size)
    keeps the padding rows of the output layer (``padded_vocab_size``) from ever being picked.
    """
    params.check()
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise DataError("generate: a prompt has no tokens (encode an empty prompt as [eod])")
    device = next(model.parameters()).device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    steps = params.maximum_tokens
    if max_seq_len is not None:
        if width >= max_seq_len:
            raise DataError(f"generate: prompt of {width} tokens leaves no room in a context of {max_seq_len}")
        steps = min(steps, max_seq_len - width)
    total = width + steps

    tokens, positions, real = _left_padded(prompts, lengths, pad_id, total)
    padding = real if bool((width - lengths > 0).any()) else None

    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    produced = torch.zeros(batch, dtype=torch.long, device=device)  # tokens kept per row
    cache = _new_cache(model, batch, total) if use_cache else None

    cursor = width
    for _ in range(steps):
        last = _last_logits(model, tokens, positions, padding, cache, cursor, vocab_limit)
        new = next_tokens(last, params, generator)
        new = torch.where(done, torch.full_like(new, pad_id), new)
        tokens[:, cursor] = new
        cursor += 1
        hit_stop = torch.isin(new, stop_ids) & ~done if stop_ids.numel() else torch.zeros_like(done)
        produced += (~done & ~hit_stop).long()
        finished |= hit_stop
        done |= hit_stop
        if stop_check is not None:
            for row in torch.nonzero(~done).flatten().tolist():
                if stop_check(tokens[row, width : width + int(produced[row])].tolist()):
                    done[row] = True
                    finished[row] = True
        if bool(done.all()):
            break

    out = []
    for row, prompt in enumerate(prompts):
        n = int(produced[row])
        out.append(
            Completion(tuple(prompt), tuple(tokens[row, width : width + n].tolist()), bool(finished[row]))
        )
    return out


def generate_tokens_no_grad(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
                            **kwargs: Any) -> list[Completion]:
    """``generate_tokens`` under ``torch.no_grad`` instead of inference mode, for a policy that trains
    right after (online RL): FSDP2's all-gather buffers made in inference mode could not be written
    again by the training forward."""
    with torch.no_grad():
        return generate_tokens.__wrapped__(model, prompts, params, **kwargs)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one occurred."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
    return text[:cut], cut < len(text)


def build_prompt(
    tokenizer: Any,
    text: str,
    *,
    apply_chat_template: bool,
    system_prompt: str | None,
    history: Sequence[tuple[str, str]] = (),
) -> list[int]:
    """Prompt ids for one input: raw text, or the chat template around it (with a system turn and
    the earlier ``(user, assistant)`` turns of an interactive chat)."""
    if apply_chat_template:
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": text})
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if system_prompt:
        text = f"{system_prompt}\n{text}" if text else system_prompt
    ids = list(tokenizer.encode(text)) if text else []
    return ids if ids else [tokenizer.eod_id]


def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    params: SamplingParams,
    *,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> list[dict[str, Any]]:
    """GPT-NeoX output records for each input text (``""`` means unconditional: start from EOD).

    ``on_batch(done, total)`` is called after each batch (progress display); ``history`` holds
    earlier chat turns (with ``apply_chat_template``).
    """
    eod = tokenizer.eod_id
    if eod is not None and eod not in params.stop_token_ids:
        params = replace(params, stop_token_ids=(*params.stop_token_ids, eod))
    stop_check = None
    if params.stop_strings:

        def stop_check(ids: list[int]) -> bool:
            # Only the tail can hold a stop string that was not there one token ago.
            tail = tokenizer.decode(ids[-(max(len(s) for s in params.stop_strings) + 4) :])
            return any(s in tail for s in params.stop_strings)

    records: list[dict[str, Any]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        began = time.time()
        prompts = [
            build_prompt(tokenizer, t, apply_chat_template=apply_chat_template, system_prompt=system_prompt,
                         history=history)
            for t in chunk
        ]
        completions = generate_tokens(
            model,
            prompts,
            params,
            pad_id=eod if eod is not None else 0,
            generator=generator,
            use_cache=use_cache,
            stop_check=stop_check,
            max_seq_len=max_seq_len,
            vocab_limit=getattr(tokenizer, "vocab_size", None),
        )
        duration = time.time() - began
        for text, done in zip(chunk, completions):
            generated, stopped = cut_at_stop(tokenizer.decode(list(done.tokens)), params.stop_strings)
            records.append(
                {
                    "context": text,
                    "text": generated if done.tokens else None,
                    "length": len(done.tokens),
                    "finished": done.finished or stopped,
                    "message": None
                    if done.tokens
                    else "WARNING: text generation did not start; the first token was a stop token",
                    "duration_seconds": duration,
                }
            )
        if on_batch is not None:
            on_batch(len(records), len(texts))
    return records


def sampling_params(gen: GenerationConfig, stop_strings: Sequence[str] = ()) -> SamplingParams:
    params = SamplingParams(
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        maximum_tokens=gen.maximum_tokens,
        stop_strings=tuple(stop_strings),
    )
    params.check()
    return params


def read_prompts(path: str, prompt_end: str) -> list[str]:
    """GPT-NeoX input-file semantics: split on ``prompt_end``, strip, drop empty prompts."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: sample_input_file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    prompts = [p.strip() for p in raw.split(prompt_end or "\n")]
    return [p for p in prompts if p]


def write_jsonl_atomic(path: str, records: Sequence[dict[str, Any]]) -> None:
    from neoxt.io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def interactive_loop(
    model: torch.nn.Module,
    tokenizer: Any,
    params: SamplingParams,
    *,
    prompt_end: str = "\n",
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    max_seq_len: int | None = None,
    stdin=None,
    stdout=None,
) -> int:
    """A prompt loop for a person at a terminal; an empty first line, EOF or ``/quit`` ends it.

    With a multi-character ``prompt_end`` lines are joined until one contains it (GPT-NeoX). With
    the chat template the loop is a conversation: earlier turns are kept until ``/reset``.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    # On a real terminal, input() gives line editing and history (through readline when present).
    use_input = stdin is sys.stdin and stdout is sys.stdout and stdin.isatty()
    if use_input:
        try:
            import readline  # noqa: F401
        except ImportError:
            pass

    def read_line(prompt: str) -> str | None:
        if use_input:
            try:
                return input(prompt)
            except EOFError:
                return None
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        return line.rstrip("\n") if line else None

    count = 0
    history: list[tuple[str, str]] = []
    while True:
        text = ""
        prompt = "Context prompt >>> "
        while True:
            line = read_line(prompt)
            prompt = "... "
            if line is None:  # EOF
                stdout.write("\n")
                return count
            if not text and line.strip() in ("", "/quit", "/exit"):
                return count
            if not text and line.strip() == "/reset":
                history.clear()
                stdout.write("[conversation reset]\n")
                prompt = "Context prompt >>> "
                continue
            if prompt_end == "\n" or prompt_end in line:
                text += line.split(prompt_end)[0] if prompt_end != "\n" else line
                break
            text += line + "\n"
        record = generate_texts(
            model,
            tokenizer,
            [text],
            params,
            apply_chat_template=apply_chat_template,
            system_prompt=system_prompt,
            generator=generator,
            use_cache=use_cache,
            max_seq_len=max_seq_len,
            history=history,
        )[0]
        if apply_chat_template:
            history.append((text, record["text"] or ""))
        stdout.write(f"Generated Text: {record['text'] or ''}\n")
        stdout.write(f"[{record['length']} tokens, {record['duration_seconds']:.2f} s]\n")
        stdout.flush()
        count += 1
