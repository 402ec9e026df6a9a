"""`neoxt publish`: a run's checkpoints to the Hugging Face Hub (see neoxt.ops.publish).

Kept apart from ops/commands.py while both are written; the lead folds ``register`` in there."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from neoxt.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="convert a run's checkpoints to HF and upload them to the Hub, resumably")
    p.add_argument("run_dir", metavar="RUN", help="the run directory (its `save`), holding global_step<N>/")
    p.add_argument("--org", required=True, help="Hub user or organisation to upload to")
    p.add_argument("--repo", default=None, help="repo name (default: the run name through the naming rules)")
    p.add_argument("--names", default=None, metavar="FILE",
                   help="naming rules (template, codenames, abbreviations; default: neoxt/ops/data/hub_names.json)")
    p.add_argument("--steps", default="all", help="all, last, or N,M,… (default: all)")
    p.add_argument("--main", default="auto", choices=("auto", "last", "none"),
                   help="which checkpoint also goes to main: the final one (train_iters, default), the last "
                        "chosen, or none")
    p.add_argument("--chat-template", default=None, metavar="TEXT|FILE",
                   help="chat template for the uploaded tokenizer (default: the run's)")
    p.add_argument("--upload-checkpoint", action="store_true",
                   help="also upload each neoxt checkpoint to <org>/neoxt-ckpt-<name> (opt-in: it is large)")
    p.add_argument("--private", action="store_true", help="create new repos private")
    p.add_argument("--max-retries", type=int, default=20, help="retries per Hub call on 429/5xx (default 20)")
    p.add_argument("--retry-min-wait", type=float, default=120.0, metavar="S", help="first backoff (default 120 s)")
    p.add_argument("--retry-max-wait", type=float, default=3600.0, metavar="S", help="longest backoff (default 3600 s)")
    p.add_argument("--upload-delay", default="0", metavar="SECONDS|random",
                   help="wait before the first upload; random = 0-12 h, to spread many jobs (default 0)")
    p.add_argument("--wait-lock", type=float, default=0.0, metavar="S",
                   help="when another publish to the repo runs, wait this long for it (default: refuse at once)")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="where HF exports are staged (default RUN/hf_export)")
    p.add_argument("--keep-export", action="store_true", help="keep the HF exports after uploading")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast exported weights")
    p.add_argument("--eval", default=None, metavar="SUITE",
                   help="afterwards, run `neoxt eval-suite SUITE` on the uploaded revisions")
    p.add_argument("--slurm", action="store_true",
                   help="submit this publish as a SLURM job (singleton per repo) instead of running it here")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH line for --slurm, e.g. --sbatch=--partition=cpu (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: write the script, submit nothing")
    p.set_defaults(handler=run_publish_command)


def options_from_args(args: argparse.Namespace):
    from neoxt.ops.hub_retry import RetryPolicy
    from neoxt.ops.publish import PublishOptions, read_template_arg, upload_delay

    if args.max_retries < 0 or args.retry_min_wait < 0 or args.retry_max_wait < args.retry_min_wait:
        raise ConfigError("--max-retries must be >= 0 and 0 <= --retry-min-wait <= --retry-max-wait")
    return PublishOptions(
        run_dir=Path(args.run_dir), org=args.org, repo=args.repo, names_file=args.names, steps=args.steps,
        main=args.main, chat_template=read_template_arg(args.chat_template), upload_checkpoint=args.upload_checkpoint,
        private=args.private, policy=RetryPolicy(args.max_retries, args.retry_min_wait, args.retry_max_wait),
        upload_delay=upload_delay(args.upload_delay), lock_wait=args.wait_lock,
        work_dir=Path(args.work_dir) if args.work_dir else None, keep_export=args.keep_export, dtype=args.dtype,
    )


def publish_argv(args: argparse.Namespace) -> list[str]:
    """The parsed options as `neoxt publish` arguments again, minus --slurm (what the job runs)."""
    argv = [str(Path(args.run_dir).resolve()), "--org", args.org, "--steps", args.steps, "--main", args.main,
            "--max-retries", str(args.max_retries), "--retry-min-wait", str(args.retry_min_wait),
            "--retry-max-wait", str(args.retry_max_wait), "--upload-delay", args.upload_delay,
            "--wait-lock", str(args.wait_lock)]
    for flag, value in (("--repo", args.repo), ("--names", args.names), ("--chat-template", args.chat_template),
                        ("--work-dir", args.work_dir), ("--dtype", args.dtype), ("--eval", args.eval)):
        if value is not None:
            is_file = flag in ("--names", "--work-dir", "--eval") or (flag == "--chat-template" and "{" not in value)
            argv += [flag, str(Path(value).resolve()) if is_file else value]
    for flag in ("upload_checkpoint", "private", "keep_export"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def run_publish_command(args: argparse.Namespace) -> int:
    from neoxt.ops.publish import eval_suite_models, plan, publish

    opts = options_from_args(args)
    p = plan(opts)  # names, steps and chat templates are checked before anything else
    aliases = eval_suite_models(args.eval, p.repo_id) if args.eval else []
    if args.slurm:
        return _submit(args, p.repo_id)
    if args.dry_run:
        raise ConfigError("--dry-run goes with --slurm")
    uploads = publish(opts, echo=lambda m: log.info("%s", m))
    new = sum(u.commit is not None for u in uploads)
    log.info("publish: %d revision(s) uploaded, %d already there → %s", new, len(uploads) - new, p.repo_id)
    if args.eval:
        steps = ",".join(str(c.step) for c in p.chosen)
        argv = ["eval-suite", args.eval, "--checkpoints", steps]
        for alias in aliases:
            argv += ["--model", alias]
        return run_eval_suite(argv)
    return 0


def run_eval_suite(argv: list[str]) -> int:
    """`neoxt eval-suite …` in this process (a seam the tests replace)."""
    from neoxt.cli import main

    log.info("publish: neoxt %s", " ".join(argv))
    return main(argv)


def _submit(args: argparse.Namespace, repo_id: str) -> int:
    from neoxt.distributed.launch import sbatch_submit
    from neoxt.io import write_text_atomic
    from neoxt.ops.publish import render_sbatch

    run_dir = Path(args.run_dir).resolve()
    argv = publish_argv(args)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    script = write_text_atomic(run_dir / f"publish-{repo_id.replace('/', '__')}.sbatch",
                               render_sbatch(argv, repo_id, log_dir, args.sbatch), mode=0o755)
    if args.dry_run:
        sys.stdout.write(script.read_text())
        return 0
    job = sbatch_submit(script)
    log.info("publish: submitted job %s (%s; singleton per repo), log %s/", job, script, log_dir)
    sys.stdout.write(f"{job}\n")
    return 0
