"""Training throughput and MFU of ~1B LLaMA and GPT-NeoX shapes: FSDP2 + compile, with/without AC.

    python benchmarks/mfu.py                      # one GPU: both shapes, seq 2048, bf16, AC off and on
    torchrun --nproc-per-node 8 benchmarks/mfu.py # one node (FSDP over 8 GPUs)
    python benchmarks/mfu.py --tiny               # CPU smoke run of the same code path (tiny shapes)

Prints one row per (shape, activation checkpointing): tokens/s (all ranks), achieved TFLOP/s per
device, MFU against ``--peak-tflops`` (default 989: H100 SXM dense bf16), peak memory. FLOPs per
token come from ``neoxt.model.flops_per_token`` (6N + attention, the PaLM/Megatron convention), so
the MFU is comparable with GPT-NeoX/Megatron/torchtitan logs. Never asserts a timing.

Data is random tokens (throughput does not depend on it). A single process still gets a one-rank
process group so FSDP2's mixed-precision path (bf16 params, fp32 reduce) is the one measured.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from neoxt.config.schema import ModelConfig, ParallelismConfig, RunConfig, TrainingConfig
from neoxt.distributed.mesh import build_mesh, init_distributed
from neoxt.distributed.parallelize import apply_fsdp, parallelize
from neoxt.model import Transformer, flops_per_token, num_params, preset


def shapes(tiny: bool) -> dict[str, ModelConfig]:
    """~1B points of each family: Pythia-1B (GPT-NeoX) and TinyLlama-1.1B (LLaMA)."""
    if tiny:
        return {
            "gpt-neox-tiny": preset("gpt-neox-tiny", max_position_embeddings=2048),
            "llama-tiny": preset("llama-tiny", max_position_embeddings=2048),
        }
    neox_layers, llama_layers = 16, 22
    return {
        "gpt-neox-1b": preset(
            "gpt-neox-7b", num_layers=neox_layers, hidden_size=2048, num_attention_heads=8, num_kv_heads=8,
            intermediate_size=8192, padded_vocab_size=50304, attention_types=("global",) * neox_layers,
        ),
        "llama-1.1b": preset(
            "llama-7b", num_layers=llama_layers, hidden_size=2048, num_attention_heads=32, num_kv_heads=4,
            intermediate_size=5632, padded_vocab_size=32000, attention_types=("global",) * llama_layers,
        ),
    }


def _single_process_group(device: torch.device) -> None:
    """A one-rank group (FSDP2 needs a mesh even on one device)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def measure(name: str, mcfg: ModelConfig, args, device: torch.device, ac: bool) -> dict:
    par = ParallelismConfig(checkpoint_activations=ac, compile=args.compile)
    cfg = RunConfig(model=mcfg, parallelism=par, training=TrainingConfig(precision=args.precision))
    mesh = build_mesh(par, dist.get_world_size(), device.type)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(mcfg)
    model = parallelize(model, cfg, mesh)
    if mesh["dp"].size() == 1:  # parallelize shards only over >1 ranks; measure FSDP2's path anyway
        apply_fsdp(model, mesh["dp_shard"], args.precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # foreach on CUDA (works on DTensors)
    world = dist.get_world_size()
    B, T = args.micro_batch, args.seq
    tokens = torch.randint(0, mcfg.padded_vocab_size, (B, T + 1), device=device)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        logits = model(inp)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()  # wait for the device
    dt = (time.perf_counter() - t0) / args.steps
    tokens_per_s = B * T * world / dt
    tflops = flops_per_token(mcfg, T) * B * T / dt / 1e12  # per device
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "model": name, "params_b": num_params(mcfg) / 1e9, "ac": ac, "compile": args.compile, "seq": T,
        "micro_batch": B, "world": world, "step_s": dt, "tokens_per_s": tokens_per_s,
        "tflops_per_device": tflops, "mfu": tflops / args.peak_tflops if args.peak_tflops else None,
        "peak_mem_gib": mem,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, seq 128, fp32 — a CPU smoke run")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 128 with --tiny)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per device per step (default 4; 2 tiny)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 (fp32 with --tiny)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--ac", choices=("both", "on", "off"), default="both", help="activation checkpointing runs")
    p.add_argument("--models", nargs="*", default=None, help="subset of the shape names")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (default 989 on CUDA)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    args.seq = args.seq or (128 if args.tiny else 2048)
    args.micro_batch = args.micro_batch or (2 if args.tiny else 4)
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")

    env = init_distributed()
    device = env.device
    _single_process_group(device)
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 989.0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rank0 = dist.get_rank() == 0
    rows = []
    table = shapes(args.tiny)
    for name in args.models or list(table):
        if name not in table:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(table)}")
        mcfg = replace(table[name], max_position_embeddings=max(table[name].max_position_embeddings, args.seq))
        for ac in {"both": (False, True), "on": (True,), "off": (False,)}[args.ac]:
            torch._dynamo.reset()
            rows.append(measure(name, mcfg, args, device, ac))
            if rank0:
                r = rows[-1]
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                mem = f"{r['peak_mem_gib']:.1f} GiB" if device.type == "cuda" else "n/a"
                print(f"{r['model']:<14} {r['params_b'] * 1e3:7.1f}M AC={'on ' if ac else 'off'} compile={r['compile']} "
                      f"seq={r['seq']} mb={r['micro_batch']} x{r['world']}  {r['tokens_per_s']:>10.0f} tok/s  "
                      f"{r['tflops_per_device']:7.2f} TFLOP/s  MFU {mfu}  mem {mem}", flush=True)
    if rank0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "precision": args.precision, "rows": rows}, f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
