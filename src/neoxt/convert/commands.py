"""`neoxt convert …`: move weights between Hugging Face, GPT-NeoX and neoxt checkpoints.

The ``convert`` group is built here. Each conversion is one sub-subcommand; handlers are thin and
import torch/transformers lazily. Other conversion modules plug into the group through
``CONVERT_MODULES`` below: each listed module exposes ``register_convert(conv)`` that adds its
subparsers (``neox-to-neoxt``, ``neoxt-to-neox``, ``inspect``) to the ``convert`` subparsers action.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add more `neoxt convert` subcommands (each defines register_convert(conv)).
CONVERT_MODULES: tuple[str, ...] = ("neoxt.convert.neox", "neoxt.convert.inspect")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="convert checkpoints between Hugging Face, GPT-NeoX and neoxt")
    conv = parser.add_subparsers(dest="convert_command", metavar="CONVERSION", required=True)
    _register_hf(conv)
    for name in CONVERT_MODULES:
        importlib.import_module(name).register_convert(conv)


def _register_hf(conv: argparse._SubParsersAction) -> None:
    p = conv.add_parser(
        "hf-to-neoxt", help="HF model dir (GPTNeoX, LLaMA, OLMo-3) → neoxt run dir (checkpoint, config, tokenizer)"
    )
    p.add_argument("--hf-model", required=True, metavar="PATH",
                   help="local HF model directory, or an org/name Hub id (downloaded into the HF cache)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="new neoxt run directory (must not exist)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: keep)")
    p.add_argument("--iteration", type=int, default=0, metavar="N", help="write global_step<N> (default 0)")
    p.set_defaults(handler=run_hf_to_neoxt)

    p = conv.add_parser("neoxt-to-hf", help="neoxt checkpoint → HF model dir (safetensors, config.json, tokenizer)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or its global_step<N>")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="new HF model directory (must not exist)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="safetensors shard size (default 5GB)")
    p.set_defaults(handler=run_neoxt_to_hf)


def run_hf_to_neoxt(args: argparse.Namespace) -> int:
    from neoxt.convert.hf import convert_hf_to_neoxt

    step_dir = convert_hf_to_neoxt(args.hf_model, args.output_dir, args.dtype, args.iteration)
    print(f"wrote {step_dir} (config: {step_dir.parent / 'config.yml'})", file=sys.stderr)
    return 0


def run_neoxt_to_hf(args: argparse.Namespace) -> int:
    from neoxt.convert.hf import convert_neoxt_to_hf

    out = convert_neoxt_to_hf(args.checkpoint, args.output_dir, args.dtype, args.max_shard_size)
    print(f"wrote {out}", file=sys.stderr)
    return 0
