"""Tokens/s of neoxt's KV-cache generator vs HF ``generate`` on the same tiny model (CPU, greedy).

One HF model is built from a config with a fixed seed and converted in memory to our Transformer,
so both sides run identical weights; every row generates exactly ``--new-tokens`` tokens (no EOS
stop). Each measurement is one timed run after one short warm-up. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/generate.py [--arch gpt_neox|llama] [--batch-sizes 1 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def build(arch: str, layers: int, hidden: int, vocab: int, seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from neoxt.model import Transformer
    from neoxt.model.hf_names import detect_architecture, hf_to_neoxt_state_dict, model_config_from_hf

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  intermediate_size=4 * hidden, max_position_embeddings=1024, pad_token_id=0, eos_token_id=None,
                  bos_token_id=None)
    torch.manual_seed(seed)
    if arch == "gpt_neox":
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.25))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=hidden // 128))
    hf.eval()
    kind = detect_architecture(hf.config.to_dict(), "benchmark")
    cfg = model_config_from_hf(hf.config, kind)
    ours = Transformer(cfg)
    ours.load_state_dict(hf_to_neoxt_state_dict(hf.state_dict(), cfg, kind))
    return hf, ours.eval()


def prompts_for(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Different lengths per row (the batched case pads on the left on both sides).
    return [torch.randint(1, vocab, (max(4, prompt_len - 3 * i),), generator=gen).tolist() for i in range(batch)]


def run_ours(model, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    from neoxt.generate import SamplingParams, generate_tokens

    began = time.perf_counter()
    out = generate_tokens(model, prompts, SamplingParams(maximum_tokens=new_tokens), pad_id=0)
    return time.perf_counter() - began, [list(c.tokens) for c in out]


def run_hf(model, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - began, out[:, width:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["gpt_neox", "llama"], default="gpt_neox")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    # One thread by default: on a shared 2-core machine OpenMP threads contend and the figures swing
    # by 2x from run to run; one thread measures the generators rather than the scheduler.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hf, ours = build(args.arch, args.layers, args.hidden, args.vocab, seed=0)
    print(f"model: {args.arch}, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
          f"prompt ~{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'batch':>5} | {'neoxt tok/s':>11} | {'HF tok/s':>9} | {'ratio':>6} | same tokens")
    print("------+-------------+-----------+--------+------------")
    for batch in args.batch_sizes:
        prompts = prompts_for(batch, args.prompt_len, args.vocab, seed=batch)
        run_ours(ours, prompts, 4)  # warm-up
        run_hf(hf, prompts, 4)
        t_ours, toks_ours = run_ours(ours, prompts, args.new_tokens)
        t_hf, toks_hf = run_hf(hf, prompts, args.new_tokens)
        n = batch * args.new_tokens
        same = "yes" if toks_ours == toks_hf else "no"
        print(f"{batch:>5} | {n / t_ours:>11.1f} | {n / t_hf:>9.1f} | {t_hf / t_ours:>5.2f}x | {same}")


if __name__ == "__main__":
    main()
