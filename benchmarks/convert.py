"""Conversion speed: HF → neoxt and neoxt → HF for a ~125M-parameter model, beside the physical floor.

The floor is reading the same HF safetensors into memory and writing them back out with safetensors
alone (no renaming, no layout changes, no DCP). Prints one table; no assertions.

    python benchmarks/convert.py [--arch llama|gpt_neox|olmo3] [--dtype fp32|bf16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _hf_config(arch: str):
    """~125M parameters: 12 layers, hidden 768, 12 heads, GPT-NeoX-20B-sized vocabulary (50304)."""
    from transformers import GPTNeoXConfig, LlamaConfig, Olmo3Config

    common = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=2048)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common, intermediate_size=3072, rotary_pct=0.25, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common, intermediate_size=2048, tie_word_embeddings=True)
    return Olmo3Config(**common, intermediate_size=2048, tie_word_embeddings=True, sliding_window=1024)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _floor(src: Path, dst: Path) -> None:
    """Read every safetensors file of ``src`` fully into memory, write it to ``dst``."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in sorted(src.glob("*.safetensors")):
        save_file(load_file(f), dst / f.name, metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=("llama", "gpt_neox", "olmo3"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per row")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from neoxt.convert.hf import convert_hf_to_neoxt, convert_neoxt_to_hf

    work = Path(args.workdir or tempfile.mkdtemp(prefix="neoxt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_config(_hf_config(args.arch)).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    hf_dir = work / "hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    model.save_pretrained(hf_dir, max_shard_size="200MB")
    del model
    nbytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))

    def best(make_out, fn) -> float:
        times = []
        for _ in range(args.repeats):
            out = make_out()
            shutil.rmtree(out, ignore_errors=True)
            times.append(_timed(lambda o=out: fn(o)))
        return min(times)

    rows = [
        ("safetensors read+write (floor)", best(lambda: work / "floor", lambda o: _floor(hf_dir, o))),
        ("hf-to-neoxt", best(lambda: work / "neoxt", lambda o: convert_hf_to_neoxt(hf_dir, o))),
        ("neoxt-to-hf", best(lambda: work / "back", lambda o: convert_neoxt_to_hf(work / "neoxt", o, max_shard_size="200MB"))),
    ]
    print(f"\n{args.arch}, {n_params / 1e6:.1f}M parameters, {args.dtype}, {nbytes / 1e6:.0f} MB of weights, "
          f"best of {args.repeats}, workdir {work}")
    print(f"{'step':<34}{'seconds':>10}{'MB/s':>10}{'x floor':>10}")
    floor = rows[0][1]
    for name, seconds in rows:
        print(f"{name:<34}{seconds:>10.2f}{nbytes / 1e6 / seconds:>10.0f}{seconds / floor:>10.2f}")
    print(f"(neoxt checkpoint on disk: {_dir_bytes(work / 'neoxt' / 'global_step0') / 1e6:.0f} MB)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
