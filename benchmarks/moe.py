"""MoE training tokens/s: neoxt's MoE step vs HF transformers' Mixtral of the same shape in a plain loop.

One HF ``MixtralForCausalLM`` is built from a config with a fixed seed and converted in memory to our
Transformer (``neoxt.model.hf_moe``), so both sides train identical weights on identical batches
(fp32 on CPU, AdamW with the same parameter groups, clipping 1.0, accumulation). Both add the
load-balancing loss with Mixtral's coefficient: ours through the trainer's step
(``accumulate_gradients``, which adds ``model.aux_loss()``), HF's the way a user would
(``output_router_logits=True``, cross-entropy + coefficient x ``out.aux_loss``). Steps alternate between the
two sides so load from other processes hits both alike; the median step is reported. Prints a
table; asserts nothing.

    .venv/bin/python benchmarks/moe.py [--experts 8] [--top-k 2] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import lm_loss, step_fns  # noqa: E402  (the sibling benchmark's step code, shared)


def build_hf(args):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                        intermediate_size=args.ffn, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                        max_position_embeddings=max(args.seq, 512), output_router_logits=True,
                        pad_token_id=0, eos_token_id=None, bos_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg)


def convert(hf):
    from neoxt.model import Transformer
    from neoxt.model.hf_names import hf_to_neoxt_state_dict, model_config_from_hf

    cfg = model_config_from_hf(hf.config, "mixtral")
    ours = Transformer(cfg)
    # In memory the HF model holds fused [E, 2F, H] / [E, H, F] experts; split them into the
    # per-expert tensors its checkpoints (and our converter) use.
    sd = dict(hf.state_dict())
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        gate_up, down = sd.pop(prefix + "mlp.experts.gate_up_proj"), sd.pop(prefix + "mlp.experts.down_proj")
        sd[prefix + "block_sparse_moe.gate.weight"] = sd.pop(prefix + "mlp.gate.weight")
        gate, up = gate_up.chunk(2, dim=1)
        for e in range(cfg.moe_num_experts):
            sd[prefix + f"block_sparse_moe.experts.{e}.w1.weight"] = gate[e]
            sd[prefix + f"block_sparse_moe.experts.{e}.w3.weight"] = up[e]
            sd[prefix + f"block_sparse_moe.experts.{e}.w2.weight"] = down[e]
    ours.load_state_dict(hf_to_neoxt_state_dict(sd, cfg, "mixtral"))
    return ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="width of each expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hf = build_hf(args)
    ours = convert(hf)
    # HF adds Mixtral's load-balancing loss as a user would; ours adds model.aux_loss() in its step.
    # Both sides compute full logits (chunk=0).
    our_step, hf_step = step_fns(
        hf, ours, args, chunk=0, hf_loss=lambda out, b: lm_loss(out, b) + hf.config.router_aux_loss_coef * out.aux_loss
    )
    for _ in range(2):
        our_step()
        hf_step()
    ours_s, hf_s = [], []
    for _ in range(args.steps):
        ours_s.append(our_step())
        hf_s.append(hf_step())

    tokens = args.micro * args.accum * args.seq
    total = sum(p.numel() for p in ours.parameters())
    print(f"Mixtral shape: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of width {args.ffn}, "
          f"top-{args.top_k}, vocab {args.vocab}, {total / 1e6:.2f}M params; batch {args.micro}x{args.accum} of "
          f"{args.seq} tokens, fp32, AdamW, CPU threads {torch.get_num_threads()}, "
          f"HF experts implementation {getattr(hf.config, '_experts_implementation', None) or 'default'}")
    print(f"{'implementation':<40}{'tokens/s (median step)':>24}{'ms/step':>10}")
    for name, secs in (("neoxt MoE step (train()'s step code)", ours_s), ("HF Mixtral + plain loop", hf_s)):
        sec = statistics.median(secs)
        print(f"{name:<40}{tokens / sec:>24,.0f}{1000 * sec:>10.1f}")
    print(f"ratio neoxt / HF (median step): {statistics.median(hf_s) / statistics.median(ours_s):.2f}x")


if __name__ == "__main__":
    main()
