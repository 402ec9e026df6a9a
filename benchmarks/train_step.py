"""Training tokens/s: ``neoxt.train.loop.train`` vs HF transformers' model in a plain torch loop.

One HF model (GPT-NeoX or LLaMA shape) is built from a config with a fixed seed and converted in
memory to our Transformer, so both sides train identical weights on identical batches with the same
precision (fp32 on CPU), optimizer (AdamW, fused where torch has it, weight decay 0.1, clipping 1.0)
and accumulation. Ours runs through the real ``train()`` loop (loss over the global token count,
NaN checks); HF runs the loop a user would write: ``model(ids).logits`` → cross-entropy → backward →
clip → step. Steps alternate between the two sides so load from other processes hits both alike,
and the median step is reported. One full ``train()`` run (schedule, metrics files, heartbeat)
is reported as well, from its own metrics.jsonl. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/train_step.py [--arch llama|gpt_neox] [--steps 20] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F


def build_hf(arch: str, layers: int, hidden: int, vocab: int, seq: int, seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  intermediate_size=4 * hidden, max_position_embeddings=max(seq, 512), pad_token_id=0,
                  eos_token_id=None, bos_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(seed)
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.25))
    return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=hidden // 64, tie_word_embeddings=False))


def convert(hf):
    from neoxt.model import Transformer
    from neoxt.model.hf_names import detect_architecture, hf_to_neoxt_state_dict, model_config_from_hf

    kind = detect_architecture(hf.config.to_dict(), "benchmark")
    cfg = model_config_from_hf(hf.config, kind)
    ours = Transformer(cfg)
    ours.load_state_dict(hf_to_neoxt_state_dict(hf.state_dict(), cfg, kind))
    return cfg, ours


class RandomBatches:
    """Micro-batches of random tokens; batch n depends only on n (same batches for both sides)."""

    def __init__(self, micro: int, seq: int, vocab: int):
        self.micro, self.seq, self.vocab, self.n = micro, seq, vocab, 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.n)
        self.n += 1
        ids = torch.randint(0, self.vocab, (self.micro, self.seq + 1), generator=g)
        return {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(self.micro, self.seq)}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def run_ours(model_cfg, model, args) -> float:
    """tokens/s of the timed window of one train() call (read from its metrics.jsonl)."""
    from neoxt.config.schema import LoggingConfig, OptimizerConfig, RunConfig, ScheduleConfig, TrainingConfig
    from neoxt.train.loop import train
    from neoxt.train.setup import TrainData

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = RunConfig(model=model_cfg)
        cfg = replace(
            cfg,
            data=replace(cfg.data, seq_length=args.seq),
            optimizer=OptimizerConfig(optimizer_type="adam", lr=1e-4, weight_decay=0.1, gradient_clipping=1.0),
            schedule=ScheduleConfig(lr_decay_style="constant"),
            training=TrainingConfig(train_iters=2 * args.steps, train_micro_batch_size_per_gpu=args.micro,
                                    gradient_accumulation_steps=args.accum, train_batch_size=args.micro * args.accum,
                                    precision="fp32", eval_iters=0),
            logging=LoggingConfig(log_dir=run_dir, log_interval=args.steps),
        )
        train(cfg, "", data=TrainData(RandomBatches(args.micro, args.seq, args.vocab)), model=model,
              log=lambda m: None)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["tokens_per_s"]


def lm_loss(out, batch) -> torch.Tensor:
    """Cross-entropy over the HF model's logits, as a user's plain loop computes it."""
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1))


def step_fns(hf, ours, args, *, chunk: int, hf_loss: Callable = lm_loss, clock: Callable[[], float] = time.perf_counter):
    """One optimizer step each: ours exactly as train() runs it (``accumulate_gradients`` with loss
    chunk ``chunk``), HF as a plain torch loop minimising ``hf_loss(output, batch)``. Each step returns
    its time by ``clock``. Shared with benchmarks/moe.py, so both compare the same step code."""
    from neoxt.config.schema import OptimizerConfig
    from neoxt.train.objectives.lm import accumulate_gradients
    from neoxt.train.optim import build_optimizer

    ocfg = OptimizerConfig(optimizer_type="adam", lr=1e-4, weight_decay=0.1, gradient_clipping=1.0)
    hf.train()
    ours.train()
    # Same optimizer construction (AdamW, same groups and fused choice) so only the step differs.
    hf_opt, our_opt = build_optimizer(hf, ocfg), build_optimizer(ours, ocfg)
    hf_data = RandomBatches(args.micro, args.seq, args.vocab)
    our_data = RandomBatches(args.micro, args.seq, args.vocab)
    our_params = [p for p in ours.parameters() if p.requires_grad]

    def hf_step() -> float:
        micro = [next(hf_data) for _ in range(args.accum)]
        began = clock()
        for b in micro:
            loss = hf_loss(hf(input_ids=b["tokens"]), b)
            (loss / args.accum).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        loss.item()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return clock() - began

    def our_step() -> float:
        micro = [next(our_data) for _ in range(args.accum)]
        began = clock()
        loss = accumulate_gradients(ours, micro, chunk=chunk)
        torch.nn.utils.clip_grad_norm_(our_params, 1.0, foreach=True)
        loss.item()  # the loop reads the loss and norm every step for its NaN check
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)
        return clock() - began

    return our_step, hf_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["llama", "gpt_neox"], default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (after 3 warm-up steps)")
    p.add_argument("--e2e-steps", type=int, default=10, help="steps of the full train() run (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--loss-chunk-size", type=int, default=None,
                   help="our loss_chunk_size (default: the config default; 0: full logits)")
    p.add_argument("--compile", action="store_true",
                   help="compile our blocks as `compile: true` does (neoxt.distributed.parallelize.apply_compile)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time steps by the wall clock or by this process's CPU time (shared machines)")
    args = p.parse_args()
    # The CPU clock: other processes on a shared machine disturb it far less (with --threads 1 the
    # two clocks agree when the machine is idle).
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    hf = build_hf(args.arch, args.layers, args.hidden, args.vocab, args.seq, seed=0)
    model_cfg, ours = convert(hf)
    if args.compile:
        from neoxt.distributed.parallelize import apply_compile

        apply_compile(ours)
    from neoxt.config.schema import RunConfig
    from neoxt.train.objectives.base import loss_chunk_size

    chunk = loss_chunk_size(RunConfig()) if args.loss_chunk_size is None else args.loss_chunk_size
    our_step, hf_step = step_fns(hf, ours, args, chunk=chunk, clock=clock)
    for _ in range(3):
        our_step()
        hf_step()
    ours_s, hf_s = [], []
    for _ in range(args.steps):  # alternate, so load spikes from other processes hit both sides
        ours_s.append(our_step())
        hf_s.append(hf_step())

    tokens_per_step = args.micro * args.accum * args.seq
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"{args.arch}: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {n_params / 1e6:.2f}M params; "
          f"batch {args.micro}x{args.accum} of {args.seq} tokens, fp32, AdamW, CPU threads {torch.get_num_threads()}")
    print(f"{'implementation':<40}{'tokens/s (median step)':>24}{'ms/step':>10}")
    ours_name = "neoxt step, compiled blocks" if args.compile else "neoxt step (train()'s step code)"
    rows = [(ours_name, statistics.median(ours_s)),
            ("HF transformers + plain loop", statistics.median(hf_s))]
    for name, sec in rows:
        print(f"{name:<40}{tokens_per_step / sec:>24,.0f}{1000 * sec:>10.1f}")
    if args.e2e_steps:
        tps = run_ours(model_cfg, convert(build_hf(args.arch, args.layers, args.hidden, args.vocab, args.seq, 0))[1],
                       replace_steps(args, args.e2e_steps))
        print(f"{'neoxt train() end to end (metrics.jsonl)':<40}{tps:>24,.0f}{1000 * tokens_per_step / tps:>10.1f}")
    print(f"ratio neoxt / HF (median step): {statistics.median(hf_s) / statistics.median(ours_s):.2f}x")


def replace_steps(args: argparse.Namespace, steps: int) -> argparse.Namespace:
    out = argparse.Namespace(**vars(args))
    out.steps = steps
    return out


if __name__ == "__main__":
    main()
