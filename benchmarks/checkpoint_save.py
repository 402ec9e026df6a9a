"""Training time lost per checkpoint: synchronous save vs ``async_save`` (background write), on CPU.

A ~125M-parameter GPT-NeoX-shaped model (12 layers, hidden 768, vocab 50304, tied embeddings) with
AdamW state (weights + two moments, ~1.5 GB) is saved several times, as the training loop saves:
the FQN state dict is built (``get_state_dict``) and handed to ``neoxt.checkpoint.save_checkpoint``
(sync) or ``AsyncCheckpointWriter.save`` (async). "Blocked" is the wall time from the start of the
save until control returns to the loop. Between saves the "training" is real AdamW steps on the
model (so the staged copy races with parameter updates, as in a run) for ``--gap`` seconds; the last
async save is waited for and its full duration reported too. The first async save also allocates
the staging buffers, so it is reported apart from the steady state.

    .venv/bin/python benchmarks/checkpoint_save.py [--saves 4] [--gap 8] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(layers: int, hidden: int, vocab: int):
    from neoxt.config.schema import ModelConfig
    from neoxt.model import Transformer

    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64,
                      num_kv_heads=hidden // 64, intermediate_size=4 * hidden, padded_vocab_size=vocab,
                      no_weight_tying=False, attention_types=("global",) * layers)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_for(model, opt, 0.0)  # one step: the optimizer state exists, as after step 1 of a run
    return model, opt


def train_for(model, opt, seconds: float) -> int:
    """Optimizer steps with random gradients for ``seconds`` (at least one); returns how many."""
    began, steps = time.perf_counter(), 0
    while steps == 0 or time.perf_counter() - began < seconds:
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        steps += 1
    return steps


def state_of(model, opt, iteration: int) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optimizer": osd, "counters": {"iteration": iteration}}


def run_sync(model, opt, root: Path, saves: int, gap: float) -> list[float]:
    from neoxt.checkpoint import save_checkpoint

    blocked = []
    for i in range(1, saves + 1):
        train_for(model, opt, gap)
        t0 = time.perf_counter()
        save_checkpoint(root, i, state_of(model, opt, i), "benchmark: sync\n")
        blocked.append(time.perf_counter() - t0)
    return blocked


def run_async(model, opt, root: Path, saves: int, gap: float) -> tuple[list[float], float]:
    from neoxt.checkpoint.async_save import AsyncCheckpointWriter

    writer = AsyncCheckpointWriter()
    blocked = []
    try:
        for i in range(1, saves + 1):
            train_for(model, opt, gap)
            t0 = time.perf_counter()
            writer.save(root, i, state_of(model, opt, i), "benchmark: async\n")
            blocked.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        writer.wait()
        last_wait = time.perf_counter() - t0
    finally:
        writer.close()
    return blocked, last_wait


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--gap", type=float, default=8.0, help="seconds of optimizer steps between saves")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, opt = build(args.layers, args.hidden, args.vocab)
    n = sum(t.numel() for t in model.parameters())
    size = sum(t.numel() * t.element_size() for t in state_of(model, opt, 0)["optimizer"]["state"].values()
               for t in t.values() if isinstance(t, torch.Tensor)) + 4 * n
    base = Path(args.dir or tempfile.mkdtemp(prefix="neoxt-ckpt-bench-"))
    try:
        sync = run_sync(model, opt, base / "sync", args.saves, args.gap)
        shutil.rmtree(base / "sync")
        blocked, last_wait = run_async(model, opt, base / "async", args.saves, args.gap)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    steady = blocked[1:] or blocked
    print(f"{n / 1e6:.0f}M params, checkpoint {size / 2**30:.2f} GiB (weights + AdamW moments), "
          f"{args.saves} saves {args.gap:.0f} s of optimizer steps apart, CPU threads {torch.get_num_threads()}")
    print(f"{'save':<36}{'blocked s (median)':>20}{'each':>40}")
    print(f"{'synchronous dcp.save + publish':<36}{statistics.median(sync):>20.2f}{str([round(s, 2) for s in sync]):>40}")
    print(f"{'async_save, first (allocates)':<36}{blocked[0]:>20.2f}")
    print(f"{'async_save, steady state':<36}{statistics.median(steady):>20.2f}"
          f"{str([round(s, 2) for s in steady]):>40}")
    print(f"last async save: waited {last_wait:.2f} s more at the end for its background write")
    print(f"async / sync blocked (steady state): {statistics.median(steady) / statistics.median(sync):.2f}; "
          f"incl. the first save: {statistics.mean(blocked) / statistics.mean(sync):.2f}")


if __name__ == "__main__":
    main()
