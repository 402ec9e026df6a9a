"""The chunked Mamba scans (``neoxt.model.ssm_scan``) beside the sequential recurrence, on CPU.

    .venv/bin/python benchmarks/mamba_scan.py [--seq-lens 256 1024] [--inner 64 768] [--batch 1] [--threads 1]

For each width and sequence length, times forward and forward+backward of:

* Mamba-1 selective scan (``d_inner`` channels, ``d_state`` 16): ``selective_scan_sequential`` (one
  Python step per token) vs ``selective_scan_chunked`` (chunks of ~sqrt(seq), all chunks advanced together);
* Mamba-2 SSD (``d_inner / 32`` heads of 32, ``d_state`` 64, one group): ``ssd_sequential`` vs
  ``ssd_chunked`` (chunks of 256, the SSD quadratic form inside).

The two compute the same thing (tests/model/test_mamba_scan.py checks ≤1e-5); each cell is the best
of ``--repeats`` runs. Prints one table (ms, and the sequential/chunked ratio); asserts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import argparse
import time

import torch
import torch.nn.functional as F

from neoxt.model.ssm_scan import (
    selective_scan_chunked,
    selective_scan_sequential,
    ssd_chunked,
    ssd_sequential,
)


def mamba1_inputs(batch: int, length: int, inner: int, state: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, length, inner, generator=g),
            F.softplus(torch.randn(batch, length, inner, generator=g) - 2),
            -torch.exp(torch.randn(inner, state, generator=g)),
            torch.randn(batch, length, state, generator=g), torch.randn(batch, length, state, generator=g),
            torch.randn(inner, generator=g)]


def mamba2_inputs(batch: int, length: int, inner: int, state: int = 64, headdim: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    heads = inner // headdim
    return [torch.randn(batch, length, heads, headdim, generator=g),
            F.softplus(torch.randn(batch, length, heads, generator=g) - 2),
            -torch.exp(torch.randn(heads, generator=g)),
            torch.randn(batch, length, 1, state, generator=g), torch.randn(batch, length, 1, state, generator=g),
            torch.randn(heads, generator=g)]


def best_ms(fn, inputs: list[torch.Tensor], backward: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        leaves = [t.clone().requires_grad_(backward) for t in inputs]
        start = time.perf_counter()
        if backward:
            y, h = fn(*leaves)
            (y.sum() + h.sum()).backward()
        else:
            with torch.no_grad():
                fn(*leaves)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--inner", type=int, nargs="+", default=[64, 768], help="d_inner values (Mamba-130M: 1536)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = [
        ("mamba1", mamba1_inputs, selective_scan_sequential, selective_scan_chunked),
        ("mamba2", mamba2_inputs, ssd_sequential, lambda *a: ssd_chunked(*a, chunk_size=256)),
    ]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}")
    header = f"{'scan':<7} {'d_inner':>7} {'seq':>5} {'pass':<8} {'sequential ms':>14} {'chunked ms':>11} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for name, make, sequential, chunked in cases:
        for inner in args.inner:
            for length in args.seq_lens:
                inputs = make(args.batch, length, inner)
                for backward in (False, True):
                    seq = best_ms(sequential, inputs, backward, args.repeats)
                    chk = best_ms(chunked, inputs, backward, args.repeats)
                    kind = "fwd+bwd" if backward else "fwd"
                    print(f"{name:<7} {inner:>7} {length:>5} {kind:<8} {seq:>14.1f} {chk:>11.1f} {seq / chk:>8.1f}x",
                          flush=True)


if __name__ == "__main__":
    main()
