"""`neoxt status`, `neoxt plot`, `neoxt cluster status|usage`, `neoxt run --slurm -- COMMAND`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def register(sub) -> None:
    _register_status(sub)
    _register_plot(sub)
    _register_cluster(sub)
    _register_run(sub)


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
