"""Peak memory of one training step: neoxt's chunked loss vs its plain full-logits path vs HF.

Each side runs in its own subprocess (fresh allocator, nothing shared) on CPU in fp32: build a
LLaMA-shaped model (HF's ``LlamaForCausalLM`` and the same weights converted to neoxt), an AdamW
optimizer, one batch of random tokens; then one step = forward, loss, backward, clip, optimizer
step. The child reads the kernel's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``,
the same figure as ``getrusage`` maxrss) before the step and after it: ``peak`` is the process's
whole peak, ``step`` the part the step itself added (activations, logits, gradients, optimizer
state). Sides:

- ``chunked``: ``neoxt.train.objectives.lm.accumulate_gradients`` with ``loss_chunk_size`` (default 1024)
- ``plain``:   the same with ``loss_chunk_size: 0`` (full [seq, vocab] fp32 logits)
- ``hf``:      ``hf(input_ids).logits`` -> ``F.cross_entropy`` -> backward, as a user's plain loop

    .venv/bin/python benchmarks/loss_memory.py [--vocab 50304 --seq 8192 --hidden 256 --layers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SIDES = ("chunked", "plain", "hf")


def _hwm_mib() -> float:
    """Peak resident set of this process so far (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(side: str, args: argparse.Namespace) -> dict:
    """One side, in this (fresh) process: returns its peak and the step's share in MiB."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).parent))
    from train_step import build_hf, convert

    torch.set_num_threads(args.threads)
    hf = build_hf("llama", args.layers, args.hidden, args.vocab, args.seq, seed=0)
    model = hf if side == "hf" else convert(hf)[1]
    if side != "hf":
        del hf
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, args.vocab, (1, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:]}
    before = _hwm_mib()
    if side == "hf":
        logits = model(input_ids=batch["tokens"]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1))
        loss.backward()
        del logits
    else:
        from neoxt.train.objectives.lm import accumulate_gradients

        chunk = args.chunk if side == "chunked" else 0
        loss = accumulate_gradients(model, [batch], chunk=chunk)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    peak = _hwm_mib()
    return {"side": side, "loss": float(loss), "peak_mib": round(peak, 1), "step_mib": round(peak - before, 1)}


def measure(args: argparse.Namespace) -> list[dict]:
    """Run each requested side in a subprocess; their results in order."""
    out = []
    for side in args.sides:
        cmd = [sys.executable, __file__, "--child", side, "--vocab", str(args.vocab), "--seq", str(args.seq),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--chunk", str(args.chunk),
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size of the chunked side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = measure(args)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"llama shape: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch 1 x {args.seq} "
          f"tokens, fp32, AdamW, CPU threads {args.threads}")
    print(f"{'side':<10}{'peak RSS MiB':>14}{'step added MiB':>16}{'loss':>10}")
    for r in rows:
        print(f"{r['side']:<10}{r['peak_mib']:>14,.0f}{r['step_mib']:>16,.0f}{r['loss']:>10.4f}")
    by = {r["side"]: r for r in rows}
    if "chunked" in by and "plain" in by:
        print(f"chunked / plain: peak {by['chunked']['peak_mib'] / by['plain']['peak_mib']:.2f}, "
              f"step {by['chunked']['step_mib'] / by['plain']['step_mib']:.2f}")
    if "chunked" in by and "hf" in by:
        print(f"chunked / hf:    peak {by['chunked']['peak_mib'] / by['hf']['peak_mib']:.2f}, "
              f"step {by['chunked']['step_mib'] / by['hf']['step_mib']:.2f}")


if __name__ == "__main__":
    main()
