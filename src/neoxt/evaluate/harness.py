"""lm-evaluation-harness through our model: an ``lm_eval`` LM over ``Transformer``, and ``run_eval``.

Scores must agree with lm-eval's own ``hf`` backend on the exported weights, so every choice that
changes a number is HFLM's (lm_eval/models/huggingface.py): context/continuation splitting through
``TemplateLM._encode_pair`` (trailing context spaces move to the continuation; the pair is encoded
whole and split at the context length), an empty context replaced by the prefix token (BOS, else
EOS), the input ``(context + continuation)[-(max_length + 1):][:-1]`` (left truncation), right padding
for scoring, ``is_greedy`` as "every continuation token is the argmax", rolling windows from
``lm_eval.utils.get_rolling_token_windows`` with context 1, and ``generate_until`` stopping at the
``until`` strings plus EOS with the context left-truncated to ``max_length - max_gen_toks``.

The tokenizer is an HF ``PreTrainedTokenizerBase`` (the same object HFLM would build), so encoding,
BOS handling and chat templates are HF's by construction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from neoxt.errors import ConfigError
from neoxt.generate import SamplingParams, generate_tokens
from neoxt.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


def progress(total: int, desc: str, disable: bool = False) -> Progress:
    """lm-eval's ``disable_tqdm`` honoured over the one progress display (``neoxt.progress``)."""
    return Progress(total, desc, "request", disable=disable or total == 0)


class TokenizerView:
    """The HF-tokenizer surface lm-eval touches, over a ``neoxt.tokenizer.Tokenizer``.

    Used for neoxt checkpoints, whose tokenizer comes from the config (tokenizer.json, GPT-2 BPE,
    SentencePiece...) rather than from an HF directory.
    """

    def __init__(self, tok: Any):
        self.tok = tok
        self.name_or_path = tok.name
        self.chat_template = tok.chat_template
        self.eos_token_id = tok.eod_id
        self.pad_token_id = tok.pad_id
        self.bos_token_id = self._single_id(tok.special_tokens_map.get("bos_token"))
        ids = (self._single_id(v) for v in tok.special_tokens_map.values())
        self._special = {i for i in ids if i is not None} | {i for i in (tok.eod_id, tok.pad_id) if i is not None}

    def _single_id(self, token: str | None) -> int | None:
        if not token:
            return None
        ids = self.tok.encode(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special]
        return self.tok.decode(list(ids))

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True, continue_final_message: bool = False, **_: Any):
        text = self.tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
        if continue_final_message and messages:
            # As transformers does: cut after the final message's content so the model continues it.
            last = messages[-1]["content"]
            at = text.rfind(last)
            if at >= 0:
                text = text[: at + len(last)]
        return self.encode(text, add_special_tokens=False) if tokenize else text


class NeoxtLM(TemplateLM):
    """lm-eval's model interface over a neoxt ``Transformer`` and an HF tokenizer."""

    backend = "causal"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        name: str = "neoxt",
        stop_token_ids: Sequence[int] = (),
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._batch_size = int(batch_size)
        cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
        self._max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048))
        self._max_gen_toks = int(max_gen_toks)
        self._name = name
        # HF generate also stops at the model's generation_config EOS ids (e.g. an instruct model's
        # end-of-turn token); pass them here to stop where lm-eval's hf backend stops.
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer of {name} has no EOS token; lm-eval needs one (set eos_token)")
        self._stop_ids = tuple(dict.fromkeys([tokenizer.eos_token_id, *stop_token_ids]))

    # --- properties lm-eval reads --------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self._name) or self._name).replace("/", "__")

    # --- tokenization (HFLM's rules) -------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        # A string that already starts with BOS (e.g. from a chat template) must not get another.
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        left = kwargs.get("left_truncate_len")
        return ids[-left:] if left else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # --- scoring -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs,
    ) -> list[tuple[float, bool]]:
        """Score continuations in right-padded batches, longest first (as HFLM batches them)."""
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        device = self.device
        bar = progress(len(requests), "neoxt loglikelihood", disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inputs, conts = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                if not ctx or not cont:
                    raise ValueError("loglikelihood request with an empty context or continuation")
                inputs.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            width = max(len(x) for x in inputs)
            batch = torch.zeros((len(inputs), width), dtype=torch.long, device=device)
            for row, inp in enumerate(inputs):
                batch[row, : len(inp)] = torch.as_tensor(inp, dtype=torch.long)
            logits = self.model(batch)
            for row, i in enumerate(chunk):
                n_in, cont = len(inputs[row]), conts[row]
                # log_softmax is per position, so only the continuation's rows need it (and fp32).
                scored = F.log_softmax(logits[row, n_in - len(cont) : n_in].float(), dim=-1)
                target = torch.as_tensor(cont, dtype=torch.long, device=device)
                greedy = bool((scored.argmax(dim=-1) == target).all())
                answer = (float(scored.gather(1, target[:, None]).sum()), greedy)
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        bar = progress(len(requests), "neoxt loglikelihood_rolling", disable_tqdm)
        for req in requests:
            (text,) = req.args
            windows = [
                (None, *lm_utils.make_disjoint_window(w))
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            bar.update(1)
        bar.close()
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) generation through the KV-cache generator."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        # Same kwargs share a batch; longest contexts first.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = progress(len(requests), "neoxt generate_until", disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ConfigError(f"max_gen_toks {max_gen} must be below the model's max length {self.max_length}")
            params = SamplingParams(
                temperature=float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0,
                top_k=int(kwargs.get("top_k", 0) or 0) if kwargs.get("do_sample") else 0,
                top_p=float(kwargs.get("top_p", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0,
                maximum_tokens=max_gen,
                stop_token_ids=self._stop_ids,
            )
            if kwargs.get("do_sample") and params.greedy:
                params = replace(params, temperature=1.0)
            tail = max(len(s) for s in until) + 4

            def stop_check(ids: list[int], until=until, tail=tail) -> bool:
                text = self.tokenizer.decode(ids[-tail:])
                return any(s and s in text for s in until)

            indices = sorted(indices, key=lambda i: -len(self.tok_encode(requests[i].args[0])))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) for i in chunk]
                completions = generate_tokens(
                    self.model,
                    prompts,
                    params,
                    pad_id=self.tokenizer.pad_token_id or 0,
                    stop_check=stop_check,
                )
                for i, done in zip(chunk, completions):
                    text = postprocess_generated_text(self.tok_decode(done.tokens), stop=until, think_end_token=None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


def hf_eos_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The EOS ids HF ``generate`` stops at for an HF model directory (generation_config.json,
    else config.json); ``int`` or list in either file."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            except json.JSONDecodeError:
                continue
            if isinstance(eos, int):
                return (eos,)
            if isinstance(eos, list):
                return tuple(int(e) for e in eos)
    return ()


def _check_tasks(task_manager: Any, tasks: Sequence[str], include_path: str | None) -> list[str]:
    """Resolve task names and globs up front so a typo fails in one line, before any model work."""
    resolved: list[str] = []
    for name in tasks:
        matched = task_manager.match_tasks([name])
        if not matched:
            where = f" (searched lm-eval's tasks and {include_path})" if include_path else ""
            raise ConfigError(f"unknown eval task '{name}'{where}")
        resolved.extend(m for m in matched if m not in resolved)
    return resolved


def _task_manager(manager_cls: Any, tasks: Sequence[str], include_path: str | None) -> Any:
    """Index only the include folder when it holds every task: indexing lm-eval's thousands of
    built-in tasks costs seconds per call, which adds up over a suite or eval during training."""
    if include_path is not None:
        local = manager_cls(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([name]) for name in tasks):
            return local
    return manager_cls(include_path=include_path)


def run_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | None = None,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    log_samples: bool = False,
    offline: bool = False,
    seed: int = 1234,
    bootstrap_iters: int = 100000,
    stop_token_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """Evaluate ``model`` on lm-eval ``tasks``; returns lm-eval's results dict.

    Training calls this for ``eval_tasks``; ``neoxt eval`` and the suite runner call it per model.
    ``offline`` sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for local task folders;
    ``stop_token_ids`` adds end-of-generation ids besides the tokenizer's EOS (see ``hf_eos_ids``).
    """
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: not a directory")
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no chat template; set tokenizer.chat_template "
            "in the config (or chat_template in tokenizer_config.json), or drop --apply-chat-template"
        )
    manager = _task_manager(TaskManager, tasks, include_path)
    task_names = _check_tasks(manager, tasks, include_path)
    if not hasattr(tokenizer, "eos_token_id") and hasattr(tokenizer, "eod_id"):
        tokenizer = TokenizerView(tokenizer)
    lm = NeoxtLM(model, tokenizer, batch_size=batch_size, max_length=max_length, stop_token_ids=stop_token_ids)
    was_training = model.training
    model.eval()
    began = time.time()
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            apply_chat_template=apply_chat_template,
            system_instruction=system_prompt,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters,
        )
    finally:
        model.train(was_training)
    log.info("eval of %s finished in %.1f s", ", ".join(task_names), time.time() - began)
    return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` for every numeric metric (stderr excluded), for logging."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            # Metrics are "<metric>,<filter>"; bare keys (alias, sample_len, name) are bookkeeping.
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            flat[f"{task}/{name}"] = float(value)
    return flat


def results_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False)


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write lm-eval's results JSON atomically (a temp name, then a rename)."""
    from neoxt.io import write_text_atomic

    return write_text_atomic(path, results_json(results))


def results_table(results: dict[str, Any]) -> str:
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table


def eval_during_training(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Any,
    iteration: int,
    out_dir: str | Path | None = None,
) -> dict[str, float]:
    """Run the config's ``eval_tasks`` (GPT-NeoX's evaluation-during-training) on the live model.

    Uses ``eval_num_fewshot``, ``eval_limit`` and ``eval_include_path``; writes lm-eval's JSON as
    ``<out_dir>/<eval_results_prefix>eval_results_iter<iteration>.json`` when ``out_dir`` is given,
    and returns ``{"eval/<task>_<metric>": value}`` (GPT-NeoX's metric names) for the metrics
    logger. Every rank must call it when the model is sharded (the forwards are collective).
    """
    ev = cfg.evaluation
    if not ev.eval_tasks:
        return {}
    results = run_eval(
        model,
        tokenizer,
        list(ev.eval_tasks),
        num_fewshot=ev.eval_num_fewshot,
        limit=ev.eval_limit,
        include_path=ev.eval_include_path,
        batch_size=max(1, cfg.training.train_micro_batch_size_per_gpu),
        seed=cfg.training.seed,
    )
    if out_dir is not None:
        write_results(Path(out_dir) / f"{ev.eval_results_prefix}eval_results_iter{iteration}.json", results)
    return {f"eval/{name.replace('/', '_')}": value for name, value in flat_metrics(results).items()}
