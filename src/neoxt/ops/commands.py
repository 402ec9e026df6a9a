"""`neoxt status`, `neoxt plot`, `neoxt cluster status|usage`, `neoxt run --slurm -- COMMAND`, `neoxt publish`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from neoxt.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub) -> None:
    _register_status(sub)
    _register_plot(sub)
    _register_cluster(sub)
    _register_run(sub)
    _register_publish(sub)


# ---------------------------------------------------------------------------------------- status
def _register_status(sub) -> None:
    p = sub.add_parser(
        "status",
        help="one row per training run: progress, loss, speed, and RUNNING/STALE/CRASHED/.../FINISHED",
        description=(
            "Find the runs under PATH (default: the current directory) and report each from its "
            "heartbeat.json, metrics.jsonl, eval.jsonl, slurm_jobs.json and SLURM's view of its jobs. "
            "Exits 1 when any run is STALE or CRASHED (for cron alerts), 0 otherwise."
        ),
    )
    p.add_argument("paths", nargs="*", default=["."], metavar="PATH", help="run directories or directories holding runs")
    p.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                   help="a running heartbeat older than this is STALE (default 600)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    p.add_argument("--watch", nargs="?", type=float, const=30.0, default=None, metavar="SECONDS",
                   help="redraw every SECONDS (default 30) until interrupted")
    p.set_defaults(handler=run_status)


def _status_once(args: argparse.Namespace) -> int:
    from neoxt.ops import status as S

    statuses = S.collect(args.paths, stale_after=args.stale_after)
    if args.json:
        print(json.dumps([s.to_json() for s in statuses], indent=2))
    else:
        print(S.table(statuses))
    return S.exit_code(statuses)


def run_status(args: argparse.Namespace) -> int:
    if args.stale_after <= 0:
        from neoxt.errors import NeoxtError

        raise NeoxtError(f"--stale-after {args.stale_after:g}: must be positive")
    if args.watch is None:
        return _status_once(args)
    rc = 0
    try:
        while True:
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(time.strftime("%Y-%m-%d %H:%M:%S"))
            rc = _status_once(args)
            sys.stdout.flush()
            time.sleep(max(args.watch, 1.0))
    except KeyboardInterrupt:
        return rc


# ---------------------------------------------------------------------------------------- plot
def _register_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="loss, lr, grad norm, tokens/s and eval scores of one or more runs, overlaid, as a PNG",
        description="Reads each run's metrics.jsonl and eval.jsonl; headless (matplotlib Agg).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or their metrics.jsonl)")
    p.add_argument("-o", "--output", default="loss.png", help="PNG to write (default loss.png)")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA weight of the smoothed loss, 0..1 (default 0.9)")
    p.add_argument("--dpi", type=int, default=100)
    p.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from neoxt.ops import plot as P

    if not 0.0 <= args.smoothing < 1.0:
        raise P.PlotError(f"--smoothing {args.smoothing}: expected a value in [0, 1)")
    series = [P.load_series(Path(r)) for r in args.runs]
    out = P.plot_runs(series, Path(args.output), smoothing=args.smoothing, dpi=args.dpi)
    print(f"wrote {out} ({len(series)} run(s))")
    return 0


# ---------------------------------------------------------------------------------------- cluster
def _register_cluster(sub) -> None:
    p = sub.add_parser("cluster", help="SLURM cluster reports: node/GPU states and your jobs, GPU-hours usage")
    csub = p.add_subparsers(dest="cluster_command", metavar="REPORT", required=True)
    s = csub.add_parser("status", help="node and GPU states, your running and pending jobs, your share")
    s.add_argument("--user", default=None, help="whose jobs (default: $USER)")
    s.set_defaults(handler=run_cluster_status)
    u = csub.add_parser("usage", help="GPU/CPU-hours by user and account, your rank, last 7 days, utilisation (sacct)")
    u.add_argument("start", nargs="?", default=None, metavar="START", help="YYYY-MM-DD[THH:MM] (default: 30 days ago)")
    u.add_argument("end", nargs="?", default=None, metavar="END", help="YYYY-MM-DD[THH:MM] or now (default: now)")
    u.add_argument("--top", type=int, default=10, help="rows per ranking (default 10)")
    u.add_argument("--user", default=None, help="whose usage and rank to show (default: $USER)")
    u.set_defaults(handler=run_cluster_usage)


def run_cluster_status(args: argparse.Namespace) -> int:
    from neoxt.ops import cluster

    print(cluster.status_report(args.user))
    return 0


def run_cluster_usage(args: argparse.Namespace) -> int:
    from neoxt.ops import cluster

    print(cluster.usage_report(args.start, args.end, top=args.top, username=args.user))
    return 0


# ---------------------------------------------------------------------------------------- run
def _register_run(sub) -> None:
    from neoxt.distributed.commands import add_environment_options

    p = sub.add_parser(
        "run",
        help="run any command on a compute node through SLURM, with neoxt launch's environment",
        description=(
            "neoxt run --slurm [options] -- COMMAND ...: write an sbatch script (resources, the env block, "
            "`module load` and setup lines of `neoxt launch`), submit it, print the job id and log path "
            "(<log-dir>/<job-name>-<jobid>.out)."
        ),
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the command and its arguments")
    s = p.add_argument_group("SLURM")
    s.add_argument("--slurm", action="store_true", help="submit through sbatch (required)")
    s.add_argument("--job-name", default="neoxt-run", help="job name and log prefix (default neoxt-run)")
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1; several run the command once per node via srun)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    s.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per node")
    s.add_argument("--time", default="02:00:00", help="walltime [D-]HH:MM:SS (default 02:00:00)")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--log-dir", default=None, help="where the log goes (default: $NEOXT_LOG_DIR, else ./logs)")
    s.add_argument("--sbatch-option", action="append", default=[], metavar="OPT", help="extra #SBATCH line, e.g. --qos=high")
    add_environment_options(s)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.set_defaults(handler=run_run)


def run_run(args: argparse.Namespace) -> int:
    from neoxt.distributed import launch as L
    from neoxt.distributed.commands import job_environment
    from neoxt.io import write_text_atomic

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not args.slurm:
        raise L.LaunchError("neoxt run: only --slurm is supported (to run here, run the command itself)")
    if args.nodes < 1:
        raise L.LaunchError(f"--nodes {args.nodes}: must be at least 1")
    log_dir = Path(args.log_dir or os.environ.get("NEOXT_LOG_DIR") or "logs").resolve()
    job = L.CommandJob(
        command=tuple(command), name=args.job_name, log_dir=str(log_dir), workdir=os.getcwd(), time=args.time,
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        partition=args.partition, account=args.account, extra_sbatch=tuple(args.sbatch_option),
        **job_environment(args),
    )
    script = L.render_command_sbatch(job)
    if args.dry_run:
        print(script)
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path = log_dir / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.sbatch"
    write_text_atomic(script_path, script, mode=0o755)
    job_id = L.sbatch_submit(script_path)
    print(f"submitted job {job_id}  log: {job.log_path(job_id)}")
    print(f"script: {script_path}")
    return 0


# ---------------------------------------------------------------------------------------- publish
def _register_publish(sub) -> None:
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
