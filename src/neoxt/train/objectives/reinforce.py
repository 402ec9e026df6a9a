"""Online REINFORCE (GPT-NeoX fork ``train_impl: reinforce``, after its training.py; RLOO after
Ahmadian et al. 2024 and TRL's ``RLOOTrainer``).

Each step, for every prompt of the global batch (a JSONL via ``reinforce_prompts``, else the prompt
part of each ``train_data_paths`` document: see ``neoxt.train.prompts``), ``reinforce_samples``
completions are sampled from the *current* weights with our KV-cache generator
(``neoxt.generate``), scored by ``reinforce_reward`` (``neoxt.train.rewards``) and trained on:

    loss_t = -logp_t * A + kl_div_beta * kl_t      over the completion tokens (EOD included)

with ``A`` the raw reward, or with ``reinforce_leave_one_out`` the reward minus the mean of the
prompt's other samples, and ``kl_t`` against the frozen reference (``kl_impl``: ``abs`` / ``mse``
(half the square) / ``kl`` of the sampled token's log-ratio, or ``full``: the KL over the whole
vocabulary, ``sum_v p(v) (log p(v) - log ref(v))`` as the fork computes it with ``F.kl_div``). No
reference is built when ``kl_div_beta`` is 0, as in the fork. The step loss is the mean over every
completion token of the global batch; the fork instead divides each micro-batch's token sum by its
token count and then by its rows again (a ``.mean()`` after a sum), a constant scale that would
make the result depend on how the batch is split, so it is not reproduced.

With ``loss_chunk_size`` > 0 and a per-token ``kl_impl`` (not ``full``, which needs both whole
distributions), the label log-probabilities of the policy and the reference are projected in chunks
(``neoxt.train.chunked_loss``), always in fp32, without the full logits.

Sampling is seeded from (``seed``, the step, the prompt's tokens): the same prompt at the same step
gets the same completions whichever rank or micro-batch holds it, so 2 processes equal 1 and a
resumed run samples what the uninterrupted one did (the step count is this objective's state).
Every completion runs the full ``reinforce_max_new_tokens`` (EOD ends what is trained and scored,
not the sampling), so every rank does the same number of forwards under FSDP2.

Logged: ``reward``, ``reward_std``, ``kl``, ``logp``, ``completion_tokens``; the samples of data-parallel
rank 0 with their rewards go to ``<save or log_dir>/samples/samples_<N>.jsonl``, one file per
``eval_interval`` (N its last iteration).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neoxt.config.schema import RunConfig
from neoxt.distributed.mesh import all_reduce_sum
from neoxt.errors import ConfigError
from neoxt.generate import SamplingParams, generate_tokens_no_grad
from neoxt.train.objectives.base import (
    ObjectiveContext,
    StepOutcome,
    forward_logits,
    loss_chunk_size,
    token_logprobs,
)
from neoxt.train.objectives.reference import frozen_reference
from neoxt.train.precision import autocast
from neoxt.train.prompts import prompt_lengths
from neoxt.train.rewards import Samples, build_reward, decode_all, leave_one_out
from neoxt.train.watchdog import keep_alive

_SUMS = ("loss", "tokens", "reward", "reward_sq", "kl", "logp", "rows")


def sampled_token_kl(ratio: torch.Tensor, kl_impl: str) -> torch.Tensor:
    """The per-position KL term from the sampled token's log-ratio (policy - reference)."""
    return {"abs": ratio.abs(), "mse": 0.5 * ratio.square(), "kl": ratio}[kl_impl]


def check_reinforce_config(cfg: RunConfig) -> None:
    t = cfg.training
    if not t.reinforce_reward:
        raise ConfigError("train_impl: reinforce needs reinforce_reward (module:function, a reward-model "
                          "checkpoint, or an http(s):// endpoint)")
    if t.reinforce_samples < 1 or (t.reinforce_leave_one_out and t.reinforce_samples < 2):
        raise ConfigError(f"reinforce_samples must be >= 1 (>= 2 with reinforce_leave_one_out), got {t.reinforce_samples}")
    if t.reinforce_max_new_tokens < 1 or t.reinforce_max_new_tokens >= cfg.data.seq_length:
        raise ConfigError(f"reinforce_max_new_tokens must be in [1, seq_length = {cfg.data.seq_length}), "
                          f"got {t.reinforce_max_new_tokens}")


def open_reinforce_data(cfg: RunConfig, dp_rank: int, dp_size: int):
    """With ``reinforce_prompts``: the JSONL prompt source (no validation data); else None (the config's data)."""
    if not cfg.training.reinforce_prompts:
        return None
    from neoxt.tokenizer import load_tokenizer
    from neoxt.train.prompts import JsonlPrompts, read_prompts
    tok = load_tokenizer(cfg.tokenizer)
    prompts = read_prompts(cfg.training.reinforce_prompts, tok, cfg.data.seq_length - cfg.training.reinforce_max_new_tokens)
    micro = cfg.training.train_micro_batch_size_per_gpu
    return JsonlPrompts(prompts, micro, dp_rank, dp_size, tok.pad_id or 0)


def _seed(base: int, step: int, prompt: list[int]) -> int:
    digest = hashlib.sha256(json.dumps([base, step, prompt]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ReinforceObjective:
    """Samples, scores and trains each step; its state is the number of sampling rounds so far."""

    check_config = staticmethod(check_reinforce_config)
    open_data = staticmethod(open_reinforce_data)

    def __init__(self, ctx: ObjectiveContext):
        from neoxt.distributed.mesh import dp_rank_size
        from neoxt.tokenizer import load_tokenizer

        check_reinforce_config(ctx.cfg)
        t = ctx.cfg.training
        self.t, self.group, self.device = t, ctx.group, ctx.device
        self.reference = frozen_reference(ctx, t.kl_div_beta > 0)
        self.model = ctx.parallelize(ctx.model)
        self.parts = [self.model]
        self.chunk = loss_chunk_size(ctx.cfg)
        self.tokenizer = load_tokenizer(ctx.cfg.tokenizer)
        self.eod = self.tokenizer.eod_id
        self.reward = build_reward(t.reinforce_reward, ctx.device)
        self.params = SamplingParams(temperature=t.reinforce_temperature, top_k=t.reinforce_top_k,
                                     top_p=t.reinforce_top_p, maximum_tokens=t.reinforce_max_new_tokens)
        self.vocab_limit = min(self.tokenizer.vocab_size, ctx.cfg.model.padded_vocab_size or self.tokenizer.vocab_size)
        self.max_prompt = ctx.cfg.data.seq_length - t.reinforce_max_new_tokens  # prompts keep their last tokens
        self.steps = 0
        self.resumed_at: int | None = None  # samples logged after this step by a killed run are dropped
        self.rank = dp_rank_size(ctx.mesh)[0] if ctx.mesh is not None else 0
        run_dir = ctx.cfg.checkpoint.save or ctx.cfg.logging.log_dir
        self.samples_dir = Path(run_dir) / "samples" if run_dir else None
        self.eval_interval = ctx.cfg.training.eval_interval

    # -- sampling -------------------------------------------------------------------------------
    def _complete(self, prompt: list[int], step: int) -> list[list[int]]:
        """``reinforce_samples`` completions of one prompt, each cut after its first EOD (kept)."""
        keep_alive()  # sampling runs inside the step: each prompt is progress for the step watchdog
        gen = torch.Generator(device=self.device).manual_seed(_seed(self.t.seed, step, prompt))
        with autocast(self.t.precision, self.device.type):
            rows = generate_tokens_no_grad(self.model, [prompt] * self.t.reinforce_samples, self.params,
                                           generator=gen, vocab_limit=self.vocab_limit)
        out = []
        for row in rows:
            ids = list(row.tokens)
            if self.eod is not None and self.eod in ids:
                ids = ids[: ids.index(self.eod) + 1]
            out.append(ids)
        return out

    def _sample(self, b: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        """One micro-batch's sequences (prompt + completion), completion mask and rewards."""
        prompts = [b["tokens"][i, max(n - self.max_prompt, 0):n].tolist() for i, n in enumerate(prompt_lengths(b))]
        was_training = self.model.training
        self.model.eval()
        try:
            completions = [c for p in prompts for c in self._complete(p, step)]
        finally:
            self.model.train(was_training)
        k = self.t.reinforce_samples
        prompt_ids = [p for p in prompts for _ in range(k)]
        bare = [c[:-1] if c and c[-1] == self.eod else c for c in completions]
        samples = Samples(prompt_ids, bare, decode_all(self.tokenizer, prompt_ids), decode_all(self.tokenizer, bare))
        rewards = torch.tensor(self.reward(samples), dtype=torch.float64, device=self.device)
        width = max(len(p) + len(c) for p, c in zip(prompt_ids, completions))
        tokens = torch.zeros(len(completions), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(completions), width - 1, dtype=torch.bool, device=self.device)
        for i, (p, c) in enumerate(zip(prompt_ids, completions)):
            tokens[i, : len(p) + len(c)] = torch.as_tensor(p + c)
            mask[i, len(p) - 1 : len(p) + len(c) - 1] = True  # positions whose next token is the completion
        advantages = leave_one_out(rewards, k) if self.t.reinforce_leave_one_out else rewards
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "mask": mask, "rewards": rewards,
                "advantages": advantages, "samples": samples}

    # -- loss -----------------------------------------------------------------------------------
    def _token_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of each label under the policy, the KL term per position), both [rows, T]."""
        fp32 = self.t.fp32_reinforce
        if self.chunk and self.t.kl_impl != "full":  # label log-probs only: projected in chunks, in fp32
            logp = token_logprobs(self.model, batch, self.t.precision, self.chunk)
            if self.reference is None:
                return logp, torch.zeros_like(logp)
            with torch.no_grad():
                ref = token_logprobs(self.reference, batch, self.t.precision, self.chunk)
            return logp, sampled_token_kl(logp - ref, self.t.kl_impl)
        logits = forward_logits(self.model, {"tokens": batch["tokens"]}, self.t.precision)
        logp_all = torch.log_softmax(logits.float() if fp32 else logits, dim=-1)
        logp = logp_all.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
        if self.reference is None:
            return logp, torch.zeros_like(logp)
        with torch.no_grad():
            ref_logits = forward_logits(self.reference, {"tokens": batch["tokens"]}, self.t.precision)
            ref_all = torch.log_softmax(ref_logits.float() if fp32 else ref_logits, dim=-1)
        if self.t.kl_impl == "full":
            return logp, F.kl_div(ref_all, logp_all, log_target=True, reduction="none").sum(-1)
        return logp, sampled_token_kl(logp - ref_all.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1),
                                      self.t.kl_impl)

    def _run(self, micro: list[dict[str, torch.Tensor]], step: int, loss_scale: float, backward: bool) -> StepOutcome:
        batches = [self._sample(b, step) for b in micro]
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)
        sums[1] = sum(int(x["mask"].sum()) for x in batches)
        count = all_reduce_sum(sums[1].clone(), self.group).clamp(min=1.0)
        for x in batches:
            with torch.set_grad_enabled(backward):
                logp, kl = self._token_terms(x)
                adv = x["advantages"].to(logp.dtype).unsqueeze(-1)
                per_token = -logp * adv + self.t.kl_div_beta * kl
                loss = torch.where(x["mask"], per_token, torch.zeros_like(per_token)).sum() / count.to(logp.dtype)
            if backward:
                (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            m, r, zero = x["mask"], x["rewards"], sums.new_zeros(())
            sums += torch.stack([loss.detach().double() * count, zero, r.sum(), r.square().sum(),
                                 kl.detach().double()[m].sum(), logp.detach().double()[m].sum(), zero + len(r)])
        sums = all_reduce_sum(sums, self.group)
        rows, tokens = float(sums[6]), max(float(sums[1]), 1.0)
        mean = float(sums[2]) / rows
        metrics = {"reward": mean, "reward_std": math.sqrt(max(float(sums[3]) / rows - mean * mean, 0.0)),
                   "kl": float(sums[4]) / tokens, "logp": float(sums[5]) / tokens, "completion_tokens": tokens / rows}
        if backward:
            self._log_samples(step + 1, batches)
        return StepOutcome(loss=sums[0] / count, tokens=int(sums[1]), metrics=metrics)

    def _log_samples(self, iteration: int, batches: list[dict[str, Any]]) -> None:
        if self.samples_dir is None or self.rank != 0:
            return
        if self.resumed_at is not None:
            _trim_samples(self.samples_dir, self.resumed_at)
            self.resumed_at = None
        interval = max(self.eval_interval, 1)
        path = self.samples_dir / f"samples_{math.ceil(iteration / interval) * interval:07d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for x in batches:
                s = x["samples"]
                for p, c, r in zip(s.prompts, s.completions, x["rewards"].tolist()):
                    f.write(json.dumps({"iteration": iteration, "prompt": p, "completion": c, "reward": r}) + "\n")

    # -- the objective interface ------------------------------------------------------------------
    def train_batch(self, micro: list[dict[str, torch.Tensor]], loss_scale: float) -> StepOutcome:
        outcome = self._run(micro, self.steps, loss_scale, backward=True)
        self.steps += 1
        return outcome

    def eval_batch(self, micro: list[dict[str, torch.Tensor]]) -> StepOutcome:
        # Validation samples with its own seeds (the step negated) and reports the REINFORCE loss.
        return self._run(micro, -1 - self.steps, 1.0, backward=False)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = self.resumed_at = int(state["steps"])


def _trim_samples(directory: Path, last: int) -> None:
    """Drop the samples of iterations after ``last`` (written by a run that was killed after the
    checkpoint this run resumed from), so the log reads as if the run had never stopped."""
    from neoxt.io import write_text_atomic

    for path in sorted(directory.glob("samples_*.jsonl")) if directory.is_dir() else []:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [x for x in lines if json.loads(x)["iteration"] <= last]
        if not kept:
            path.unlink()
        elif len(kept) < len(lines):
            write_text_atomic(path, "".join(kept))
