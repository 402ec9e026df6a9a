"""`neoxt generate`: GPT-NeoX's text generation modes over a neoxt checkpoint or an HF directory.

Also home of ``load_for_inference`` (config + model + tokenizer from CONFIG… / --model), which
``neoxt eval`` shares. Heavy imports stay inside functions so ``neoxt --help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from neoxt.dtypes import PRECISIONS
from neoxt.errors import ConfigError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Inference:
    cfg: Any  # RunConfig
    model: Any  # Transformer, eval mode
    tokenizer: Any  # neoxt.tokenizer.Tokenizer
    source: str  # the model path it came from
    is_hf_dir: bool


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG… / --set / --model / --device / --dtype, shared by generate and eval."""
    p.add_argument("configs", nargs="*", metavar="CONFIG", help="GPT-NeoX YAML files, merged in order")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--model", "--load", dest="model_path", metavar="PATH",
                   help="neoxt run dir, global_step dir or HF model dir (default: the config's `load`)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(PRECISIONS), default=None, help="weights dtype (default: as stored)")
    p.add_argument("--chat-template", default=None, metavar="TEXT|FILE",
                   help="a Jinja chat template (or a file) for a model that has none")


def local_model_path(source: str) -> str:
    """A local path as is (run dir, global_step dir, HF dir); an 'org/name' Hub id downloaded first."""
    if Path(source).exists():
        return source
    from neoxt.checkpoint.loading import resolve_hf_source

    return str(resolve_hf_source(source))


def load_for_inference(args: argparse.Namespace) -> Inference:
    """The run config, model and tokenizer named by CONFIG… and/or --model."""
    import torch

    from neoxt import load_model
    from neoxt.checkpoint import resolve_checkpoint
    from neoxt.checkpoint.loading import is_hf_model_dir, read_checkpoint_config
    from neoxt.config import load_config
    from neoxt.config.schema import RunConfig
    from neoxt.dtypes import dtype_of
    from neoxt.tokenizer import load_tokenizer

    cfg = load_config(args.configs, args.overrides) if (args.configs or args.overrides) else RunConfig()
    path = args.model_path or cfg.checkpoint.load
    if not path:
        raise ConfigError("no model to load: pass --model PATH or set `load` in the config")
    path = local_model_path(str(path))
    hf_dir = is_hf_model_dir(path)
    tok_cfg = cfg.tokenizer
    if not tok_cfg.vocab_file and not hf_dir:
        # A bare checkpoint: its saved config knows the tokenizer.
        tok_cfg = read_checkpoint_config(resolve_checkpoint(path)).tokenizer
    template = getattr(args, "chat_template", None) or tok_cfg.chat_template
    if tok_cfg.vocab_file or tok_cfg.tokenizer_type == "CharLevelTokenizer":
        tokenizer = load_tokenizer(tok_cfg, chat_template=template)
    elif hf_dir:
        tokenizer = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(path), chat_template=template)
    else:
        raise ConfigError(f"{path}: no tokenizer known; set tokenizer_type/vocab_file in the config")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype_of(args.dtype) if args.dtype else None
    model = load_model(path, device=device, dtype=dtype)
    return Inference(cfg, model, tokenizer, str(path), hf_dir)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text (KV cache): unconditional, input-file or interactive (GPT-NeoX keys)",
        description="Generation keys come from the config (text_gen_type, maximum_tokens, temperature, top_k, "
        "top_p, num_samples, sample_input_file, sample_output_file, prompt_end, recompute, seed); the flags "
        "below override them.",
    )
    add_model_arguments(p)
    p.add_argument("--text-gen-type", choices=["unconditional", "input-file", "interactive"])
    p.add_argument("--sample-input-file")
    p.add_argument("--sample-output-file")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--maximum-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="seed of the sampling generator (default: the config's seed)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when the output contains STRING (repeatable); EOD always stops")
    p.add_argument("--apply-chat-template", action="store_true", default=None)
    p.add_argument("--system-prompt")
    p.add_argument("--recompute", action="store_true", default=None, help="no KV cache (slow; for checks)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward batch")
    p.set_defaults(handler=run)


def _generation_config(args: argparse.Namespace, gen):
    changes = {
        name: getattr(args, name)
        for name in ("text_gen_type", "sample_input_file", "sample_output_file", "num_samples", "maximum_tokens",
                     "temperature", "top_k", "top_p", "apply_chat_template", "system_prompt", "recompute")
        if getattr(args, name) is not None
    }
    return replace(gen, **changes)


def _progress(total: int, what: str):
    """``generate_texts``'s ``on_batch(done, total)`` callback over the one progress display."""
    from neoxt.progress import Progress

    bar = Progress(total, what, "prompt", every_s=0.0)

    def on_batch(done: int, total: int) -> None:
        bar.update(done - bar.done)
        if done >= total:
            bar.close()

    return on_batch


def run(args: argparse.Namespace) -> int:
    import torch

    from neoxt.generate import (
        generate_texts,
        interactive_loop,
        read_prompts,
        sampling_params,
        write_jsonl_atomic,
    )

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "sample_output_file", None):
        from neoxt.io import check_writable

        check_writable(args.sample_output_file, "--sample-output-file")  # before loading the model
    inf = load_for_inference(args)
    gen = _generation_config(args, inf.cfg.generation)
    params = sampling_params(gen, args.stop)
    seed = args.seed if args.seed is not None else inf.cfg.training.seed
    generator = torch.Generator(device=next(inf.model.parameters()).device).manual_seed(seed)
    common = dict(
        apply_chat_template=gen.apply_chat_template,
        system_prompt=gen.system_prompt,
        generator=generator,
        use_cache=not gen.recompute,
        max_seq_len=inf.model.cfg.max_position_embeddings,
    )
    if gen.apply_chat_template and not inf.tokenizer.chat_template:
        raise ConfigError(f"{inf.source}: apply_chat_template is set but the tokenizer has no chat template; "
                          "set tokenizer chat_template in the config or pass --chat-template")

    if gen.text_gen_type == "interactive":
        interactive_loop(inf.model, inf.tokenizer, params, prompt_end=gen.prompt_end, **common)
        return 0

    if gen.text_gen_type == "input-file":
        if not gen.sample_input_file:
            raise ConfigError("text_gen_type input-file needs sample_input_file (or --sample-input-file)")
        texts = read_prompts(gen.sample_input_file, gen.prompt_end)
        out_path = gen.sample_output_file or f"{gen.sample_input_file}.output.jsonl"
    else:
        if gen.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {gen.num_samples}")
        texts = [""] * gen.num_samples
        out_path = gen.sample_output_file
    if out_path:
        from neoxt.io import check_writable

        check_writable(out_path, "sample_output_file")  # before the generation, not after it
    log.info("generate: %d prompt(s), %s, maximum_tokens %d", len(texts), gen.text_gen_type, params.maximum_tokens)
    records = generate_texts(inf.model, inf.tokenizer, texts, params, batch_size=args.batch_size,
                             on_batch=_progress(len(texts), "generate"), **common)
    if out_path:
        write_jsonl_atomic(out_path, records)
        log.info("generate: wrote %d record(s) to %s", len(records), out_path)
    else:
        import json

        for rec in records:
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return 0
