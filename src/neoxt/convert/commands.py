"""`neoxt convert …`: move weights between Hugging Face, GPT-NeoX and neoxt checkpoints.

All of the ``convert`` group's command-line code is here: each conversion is one sub-subcommand
whose handler is thin and imports its worker lazily (``hf.py``, ``neox.py``, ``inspect.py``), so
``neoxt --help`` does not import torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from neoxt.dtypes import PRECISIONS
from neoxt.errors import ConversionError

# --dtype: neoxt's precision names and torch's (the fork's converters take bfloat16/float16/float32).
DTYPE_NAMES = (*PRECISIONS, "bfloat16", "float16", "float32")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="convert checkpoints between Hugging Face, GPT-NeoX and neoxt")
    conv = parser.add_subparsers(dest="convert_command", metavar="CONVERSION", required=True)
    _register_hf(conv)
    _register_neox(conv)
    _register_inspect(conv)


def _register_hf(conv: argparse._SubParsersAction) -> None:
    p = conv.add_parser(
        "hf-to-neoxt", help="HF model dir (GPTNeoX, LLaMA, OLMo-3) → neoxt run dir (checkpoint, config, tokenizer)"
    )
    p.add_argument("--hf-model", required=True, metavar="PATH",
                   help="local HF model directory, or an org/name Hub id (downloaded into the HF cache)")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="Hub branch, tag or commit of --hf-model (e.g. global_step1000)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="new neoxt run directory (must not exist; default: <model name>-neoxt)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="cast weights (default: keep)")
    p.add_argument("--iteration", type=int, default=0, metavar="N", help="write global_step<N> (default 0)")
    p.add_argument("--save-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer files into <output-dir>/tokenizer (default: on)")
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="accepted for the fork's converter's command line; neoxt checkpoints reshard on load")
    p.set_defaults(handler=run_hf_to_neoxt)

    p = conv.add_parser("neoxt-to-hf", help="neoxt checkpoint → HF model dir (safetensors, config.json, tokenizer)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or its global_step<N>")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="new HF model directory (must not exist)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="cast weights (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="safetensors shard size (default 5GB)")
    p.set_defaults(handler=run_neoxt_to_hf)


def run_hf_to_neoxt(args: argparse.Namespace) -> int:
    from neoxt.convert.hf import MODEL_ONLY_CONFIG, convert_hf_to_neoxt, default_output_dir

    if args.tp is not None and args.tp != 1:
        print(f"neoxt: note: --tp {args.tp} is not needed: neoxt checkpoints reshard on load "
              "(set model_parallel_size in the training config)", file=sys.stderr)
    out = args.output_dir or default_output_dir(args.hf_model)
    step_dir = convert_hf_to_neoxt(args.hf_model, out, args.dtype, args.iteration, revision=args.revision,
                                   save_tokenizer=args.save_tokenizer)
    run = step_dir.parent
    print(f"wrote {step_dir} (config: {run / 'config.yml'}; model-only, to merge with a training config: "
          f"{run / MODEL_ONLY_CONFIG})", file=sys.stderr)
    return 0


def run_neoxt_to_hf(args: argparse.Namespace) -> int:
    from neoxt.convert.hf import convert_neoxt_to_hf

    out = convert_neoxt_to_hf(args.checkpoint, args.output_dir, args.dtype, args.max_shard_size)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _register_neox(conv: argparse._SubParsersAction) -> None:
    p = conv.add_parser(
        "neox-to-neoxt",
        help="GPT-NeoX (DeepSpeed) global_stepN, sequential or pipeline, any TP size → new neoxt run dir",
    )
    p.add_argument("--input-dir", required=True, metavar="DIR", help=".../global_stepN, or the save dir holding `latest`")
    p.add_argument(
        "--config", nargs="+", metavar="YML",
        help="the run's GPT-NeoX config file(s) (default: the YAML files in <input-dir>/configs/)",
    )
    p.add_argument("--output-dir", metavar="DIR", help="new neoxt run directory (default: <save dir>-neoxt beside it)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="cast weights (default: keep the checkpoint's)")
    p.add_argument("--iteration", type=int, default=None, metavar="N", help="write global_step<N> (default: the checkpoint's)")
    p.set_defaults(handler=run_neox_to_neoxt)

    p = conv.add_parser(
        "neoxt-to-neox",
        help="neoxt checkpoint → GPT-NeoX (DeepSpeed) global_stepN + latest + configs/ (weights only: "
        "load it in GPT-NeoX with finetune: true)",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="neoxt run directory or its global_step<N>")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="GPT-NeoX save directory (created if missing)")
    p.add_argument("--model-parallel-size", type=int, default=1, metavar="N", help="tensor-parallel shards to write")
    p.add_argument(
        "--pipeline-layout", action="store_true",
        help="write layer_XX-model_YY files (pipe_parallel_size >= 1) instead of sequential mp_rank_XX files",
    )
    p.add_argument(
        "--te-layout", action="store_true",
        help="Transformer Engine names (attention.qkv, mlp.fc1_weight, …) for te_mha / te_layernorm_mlp configs, "
        "as the fork's HF converter writes by default",
    )
    p.set_defaults(handler=run_neoxt_to_neox)


def _default_configs(input_dir: Path) -> list[str]:
    """The run's config: ``configs/*.yml`` inside the checkpoint (what GPT-NeoX saves), else the
    fork's converter's ``neox_config.json`` (or a ``neox_config.yml``) in the save directory."""
    from neoxt.convert.neox_files import find_neox_files

    files = find_neox_files(input_dir)
    found = sorted(str(f) for f in (files.path / "configs").glob("*.y*ml"))
    if found:
        return found
    for where in (files.path, files.path.parent):
        for name in ("neox_config.json", "neox_config.yml"):
            if (where / name).is_file():
                return [str(where / name)]
    raise ConversionError(f"{files.path}: no configs/*.yml inside the checkpoint and no neox_config.json beside it; "
                          "pass the run's config with --config")


def run_neox_to_neoxt(args: argparse.Namespace) -> int:
    from neoxt.config import load_config
    from neoxt.convert.neox import import_neox
    from neoxt.convert.neox_files import find_neox_files
    from neoxt.dtypes import dtype_of

    input_dir = Path(args.input_dir)
    configs = args.config or _default_configs(input_dir)
    run_cfg = load_config(configs)
    if args.output_dir:
        out = Path(args.output_dir)
    else:
        save_dir = find_neox_files(input_dir).path.parent
        out = save_dir.with_name(save_dir.name + "-neoxt")
    dtype = dtype_of(args.dtype) if args.dtype else None
    step = import_neox(input_dir, run_cfg, out, iteration=args.iteration, dtype=dtype)
    print(f"neoxt: wrote {step} (config: {step.parent / 'config.yml'})", file=sys.stderr)
    return 0


def run_neoxt_to_neox(args: argparse.Namespace) -> int:
    from neoxt.convert.neox import export_neox

    step = export_neox(args.checkpoint, args.output_dir, args.model_parallel_size, args.pipeline_layout,
                       te_layout=args.te_layout)
    layout = ("pipeline" if args.pipeline_layout else "sequential") + (", TE names" if args.te_layout else "")
    print(f"neoxt: wrote {step} ({layout}, model_parallel_size {args.model_parallel_size})", file=sys.stderr)
    return 0


def _register_inspect(conv: argparse._SubParsersAction) -> None:
    p = conv.add_parser("inspect", help="what a checkpoint (neoxt, HF, GPT-NeoX) holds: iteration, tensors, parameters")
    p.add_argument("path", metavar="PATH", help="neoxt run dir or global_stepN, HF model dir, GPT-NeoX global_stepN")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verify", action="store_true",
                   help="also check every file of a neoxt checkpoint against its checksums.sha256 (reads all of it)")
    p.set_defaults(handler=run_inspect)


def _verify(info) -> None:
    """``inspect --verify``: a mismatch is a CheckpointError (exit 2); the outcome is one stderr line."""
    from pathlib import Path

    from neoxt.checkpoint.integrity import MANIFEST_FILE, verify_checkpoint

    if info.format != "neoxt":
        print(f"neoxt: {info.path}: nothing to verify ({info.format} checkpoints carry no checksums)", file=sys.stderr)
        return
    n = verify_checkpoint(Path(info.path))
    if n is None:
        print(f"neoxt: {info.path}: no {MANIFEST_FILE} (saved before neoxt recorded checksums); not verified",
              file=sys.stderr)
    else:
        print(f"neoxt: {info.path}: all {n} files match {MANIFEST_FILE}", file=sys.stderr)


def run_inspect(args: argparse.Namespace) -> int:
    """CLI handler: ``neoxt convert inspect PATH [--json]``."""
    from neoxt.convert.inspect import format_table, inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if getattr(args, "verify", False):
        _verify(info)
    text = json.dumps(info.to_json(), indent=2) if getattr(args, "json", False) else format_table(info)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `neoxt convert inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
