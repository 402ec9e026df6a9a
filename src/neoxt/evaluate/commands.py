"""`neoxt eval` (lm-eval tasks on one model) and `neoxt eval-suite` (models × system prompts × folders)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from neoxt.dtypes import PRECISIONS
from neoxt.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from neoxt.generate_commands import add_model_arguments

    p = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a neoxt checkpoint or HF directory")
    add_model_arguments(p)
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="lm-eval task names or globs (default: the config's eval_tasks)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of extra task YAMLs")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="results JSON (a .json file, or a directory for results_<time>.json)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--log-samples", action="store_true", help="keep per-document outputs in the JSON")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--offline", action="store_true", help="set HF_HUB_OFFLINE/HF_DATASETS_OFFLINE (local tasks)")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="with a Hub id as --model: the branch to evaluate (e.g. global_step1000)")
    p.set_defaults(handler=run_eval_command)

    s = sub.add_parser("eval-suite", help="every model × system prompt × task folder of a suite file, resumable")
    s.add_argument("suite", help="suite YAML (see neoxt.evaluate.suite for the format)")
    s.add_argument("--print-jobs", action="store_true",
                   help="print one `neoxt eval` command per pending pair (for SLURM) and run nothing")
    s.add_argument("--slurm", action="store_true",
                   help="submit one sbatch job per pending pair (options: the suite's `slurm` block)")
    s.add_argument("--dry-run", action="store_true", help="with --slurm: write the scripts, submit nothing")
    s.add_argument("--gather", action="store_true", help="only build the table from existing result files")
    s.add_argument("--model", dest="models", action="append", default=None, metavar="NAME",
                   help="model alias or group to run, instead of the suite's `run` (repeatable)")
    s.add_argument("--system-prompt", default=None, metavar="NAME",
                   help="run only this system prompt (its name in system_prompts.json)")
    s.add_argument("--checkpoints", default=None, metavar="all|N,M",
                   help="evaluate intermediate checkpoints: a local run's global_step<N>, a Hub repo's branches")
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", choices=list(PRECISIONS), default=None)
    s.add_argument("--offline", action="store_true", help="set HF_HUB_OFFLINE/HF_DATASETS_OFFLINE")
    s.set_defaults(handler=run_suite_command)

    r = sub.add_parser("score", help="score a JSONL of conversations with a reward model (train_impl: rm)")
    add_model_arguments(r)
    r.add_argument("input", metavar="JSONL", help="one record a line: {'messages': [...]} or {'text': ...}")
    r.add_argument("--output", required=True, metavar="JSONL", help="the records, each with its 'score' added")
    r.add_argument("--batch-size", type=int, default=8)
    r.set_defaults(handler=run_score_command)


def run_score_command(args: argparse.Namespace) -> int:
    from neoxt.evaluate.reward import read_records, score_records
    from neoxt.generate import write_jsonl_atomic
    from neoxt.generate_commands import load_for_inference

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    records = read_records(args.input)
    inf = load_for_inference(args)
    scores = score_records(inf.model, inf.tokenizer, records, args.batch_size)
    write_jsonl_atomic(args.output, [{**r, "score": s} for r, s in zip(records, scores)])
    mean = sum(scores) / len(scores) if scores else float("nan")
    print(f"scored {len(scores)} records (mean {mean:.4f}) -> {args.output}")
    return 0


def eval_tokenizer(inf: Any, chat_template: str | None) -> Any:
    """HF's own tokenizer for an HF directory (so encoding equals lm-eval's hf backend), else a view
    of the config's tokenizer with the HF surface lm-eval uses."""
    from neoxt.evaluate.harness import TokenizerView

    if inf.is_hf_dir and not inf.cfg.tokenizer.vocab_file:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(inf.source)
        if chat_template:
            tok.chat_template = inf.tokenizer.chat_template  # already resolved from text or file
        return tok
    return TokenizerView(inf.tokenizer)


def _output_path(output: str) -> Path:
    path = Path(output)
    if path.suffix == ".json":
        return path
    return path / f"results_{time.strftime('%Y-%m-%dT%H-%M-%S')}.json"


def run_eval_command(args: argparse.Namespace) -> int:
    from neoxt.evaluate.harness import hf_eos_ids, results_table, run_eval, write_results
    from neoxt.generate_commands import load_for_inference

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.tasks and not (args.configs or args.overrides):
        raise ConfigError("no tasks: pass --tasks or set eval_tasks in the config")
    if args.revision:
        from neoxt.evaluate.models_registry import hub_snapshot

        if not args.model_path:
            raise ConfigError("--revision goes with --model ORG/NAME")
        args.model_path = hub_snapshot(args.model_path, args.revision)
    if args.output:
        from neoxt.io import check_writable

        out = Path(args.output)
        check_writable(out, "--output", directory=out.suffix != ".json")  # before the run, not after it
    inf = load_for_inference(args)
    ev = inf.cfg.evaluation
    tasks = args.tasks or list(ev.eval_tasks)
    if not tasks:
        raise ConfigError("no tasks: pass --tasks or set eval_tasks in the config")
    results = run_eval(
        inf.model,
        eval_tokenizer(inf, args.chat_template),
        tasks,
        num_fewshot=args.num_fewshot if args.num_fewshot is not None else ev.eval_num_fewshot,
        limit=args.limit if args.limit is not None else ev.eval_limit,
        include_path=args.include_path or ev.eval_include_path,
        apply_chat_template=args.apply_chat_template,
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        max_length=args.max_length,
        log_samples=args.log_samples,
        offline=args.offline,
        seed=args.seed,
        stop_token_ids=hf_eos_ids(inf.source) if inf.is_hf_dir else (),
    )
    results.setdefault("config", {})["model"] = inf.source
    sys.stdout.write(results_table(results) + "\n")
    if args.output:
        path = write_results(_output_path(args.output), results)
        log.info("eval: results written to %s", path)
    return 0


def _has_template(entry: Any) -> bool:
    """Whether a suite model's tokenizer carries a chat template (reads tokenizer files only)."""
    from neoxt.checkpoint import resolve_checkpoint
    from neoxt.checkpoint.loading import is_hf_model_dir, read_checkpoint_config
    from neoxt.evaluate.models_registry import local_source
    from neoxt.tokenizer import load_tokenizer

    src = local_source(entry)
    if not Path(src).exists() or is_hf_model_dir(src):
        return bool(load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=src).chat_template)
    return bool(load_tokenizer(read_checkpoint_config(resolve_checkpoint(src)).tokenizer).chat_template)


def run_suite_command(args: argparse.Namespace) -> int:
    from neoxt.evaluate.suite import build_jobs, job_command, load_suite, run_suite, shell_line

    if args.offline:
        import os

        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    suite = load_suite(args.suite, models=args.models, system_prompt=args.system_prompt, checkpoints=args.checkpoints)
    if args.print_jobs:
        for job in build_jobs(suite):
            if not job.result_path.is_file():
                sys.stdout.write(shell_line(job_command(job, suite)) + "\n")
        return 0
    echo = lambda m: log.info("%s", m)  # noqa: E731
    if args.gather:
        from neoxt.evaluate.suite import gather_only, table_markdown

        sys.stdout.write(table_markdown(gather_only(suite, echo=echo)))
        return 0
    if args.slurm:
        from neoxt.evaluate.suite import submit_slurm

        submit_slurm(suite, _has_template, dry_run=args.dry_run, echo=echo)
        return 0
    if args.dry_run:
        raise ConfigError("--dry-run goes with --slurm")

    from neoxt.evaluate.harness import hf_eos_ids, run_eval
    from neoxt.evaluate.models_registry import local_source
    from neoxt.generate_commands import load_for_inference

    loaded: dict[str, Any] = {}

    def evaluate_pair(job) -> dict[str, Any]:
        if job.model.alias not in loaded:
            loaded.clear()  # one model in memory at a time
            ns = argparse.Namespace(configs=[], overrides=[], model_path=local_source(job.model),
                                    device=args.device, dtype=args.dtype, chat_template=job.model.chat_template)
            inf = load_for_inference(ns)
            loaded[job.model.alias] = (inf, eval_tokenizer(inf, job.model.chat_template))
        inf, tok = loaded[job.model.alias]
        return run_eval(
            inf.model, tok, list(job.folder.tasks), num_fewshot=suite.num_fewshot, limit=suite.limit,
            include_path=str(job.folder.path), apply_chat_template=True, system_prompt=job.prompt_text,
            batch_size=suite.batch_size, max_length=suite.max_length, seed=suite.seed,
            stop_token_ids=hf_eos_ids(inf.source) if inf.is_hf_dir else (),
        )

    _, _, rows = run_suite(suite, evaluate_pair, _has_template, echo=echo)
    from neoxt.evaluate.suite import table_markdown

    sys.stdout.write(table_markdown(rows))
    return 0

