"""`neoxt launch`: run `neoxt train` under torchrun on this node, or submit it to SLURM."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from neoxt.io import write_text_atomic


def register(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="run `neoxt train` on this node with torchrun, or on many nodes through SLURM",
        description=(
            "Without --slurm: exec torchrun on this node with --nproc-per-node processes (default: the "
            "number of GPUs, else 1). With --slurm: write an sbatch script (srun + torchrun, c10d "
            "rendezvous on the first node, a walltime signal that makes training checkpoint and exit), "
            "submit it --chain times with afterany dependencies, print the job ids and log paths."
        ),
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="GPT-NeoX style YAML files, merged in order")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); passed on to `neoxt train`")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: GPUs per node, else 1)")
    p.add_argument("--dry-run", action="store_true", help="print the command / sbatch script, submit nothing")
    s = p.add_argument_group("SLURM")
    s.add_argument("--slurm", action="store_true", help="submit to SLURM instead of running here")
    s.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (0 for CPU-only nodes; default 4)")
    s.add_argument("--time", default="24:00:00", help="walltime [D-]HH:MM:SS (default 24:00:00)")
    s.add_argument("--partition", default=None, help="#SBATCH --partition")
    s.add_argument("--account", default=None, help="#SBATCH --account")
    s.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPU cores per node for torchrun and its workers (also passed to srun)")
    add_environment_options(s)
    s.add_argument("--chain", type=int, default=1, metavar="N", help="queue N jobs, each afterany the previous")
    s.add_argument("--signal", default=None, metavar="SIG@SECONDS", help="walltime warning signal (default USR1@120)")
    s.add_argument("--log-dir", default=None, help="where <run_name>-<jobid>.out go (default: log_dir, else <save>/logs)")
    s.add_argument("--run-name", default=None, help="job name and log prefix (default: basename of save)")
    s.add_argument("--sbatch-option", action="append", default=[], metavar="OPT", help="extra #SBATCH line, e.g. --qos=high")
    p.set_defaults(handler=run_launch)


def add_environment_options(group) -> None:
    """--env, --env-file, --module, --setup: the job environment, shared by `neoxt launch` and `neoxt run`."""
    group.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                       help="add to the script's env block (repeatable)")
    group.add_argument("--env-file", action="append", default=[], metavar="FILE",
                       help="KEY=VAL lines added to the env block")
    group.add_argument("--module", dest="modules", action="append", default=[], metavar="NAME",
                       help="`module load NAME` before the job starts (repeatable, in order)")
    group.add_argument("--setup", action="append", default=[], metavar="'LINE'",
                       help="a shell line run before the job starts, after the modules (repeatable, in order)")


def job_environment(args: argparse.Namespace) -> dict:
    """The parsed --env/--env-file/--module/--setup as SlurmJob/CommandJob fields."""
    from neoxt.distributed import launch as L

    env = L.parse_env_items(args.env)
    for f in args.env_file:
        env += L.read_env_file(f)
    L.check_modules(args.modules)
    return {"env": tuple(env), "modules": tuple(args.modules), "setup": tuple(args.setup)}


def _load(configs: list[str], overrides: list[str], world_size: int):
    from neoxt.config import load_config

    return load_config(configs, overrides, world_size=world_size)


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install should not stop a CPU launch
        return 0


def run_launch(args: argparse.Namespace) -> int:
    from neoxt.distributed import launch as L

    for flag, value in (("--nproc-per-node", args.nproc_per_node), ("--nodes", getattr(args, "nodes", None))):
        if value is not None and value < 1:  # 0 used to fall back silently to the default
            raise L.LaunchError(f"{flag} must be at least 1, got {value}")

    if args.slurm:
        gpus = 4 if args.gpus_per_node is None else args.gpus_per_node
        nproc = args.nproc_per_node or max(gpus, 1)
        world = nproc * args.nodes
    else:
        nproc = args.nproc_per_node or max(_local_gpus(), 1)
        world = nproc
    cfg = _load(args.configs, args.overrides, world)
    par = cfg.parallelism
    tp, pp = max(par.model_parallel_size, 1), max(par.pipe_parallel_size, 1)
    configs = [str(Path(c).resolve()) for c in args.configs]
    train_args = [*configs, *(f"--set={o}" for o in args.overrides)]
    if not args.slurm:
        L.check_world(nproc, tp, pp, "--nproc-per-node")
        argv = [sys.executable, *L.torchrun_args(nproc, train_args)]
        if args.dry_run:
            print(shlex.join(argv))
            return 0
        os.execv(sys.executable, argv)

    if args.chain < 1:
        raise L.LaunchError(f"--chain {args.chain}: must be at least 1")
    if args.nodes < 1:
        raise L.LaunchError(f"--nodes {args.nodes}: must be at least 1")
    save = cfg.checkpoint.save
    if not save:
        raise L.LaunchError(f"{configs[0]}: 'save' must be set for --slurm (each job resumes from it)")
    secs = L.parse_time(args.time)
    _, sig_secs = L.parse_signal(args.signal or L.DEFAULT_SIGNAL)
    if sig_secs >= secs:
        raise L.LaunchError(f"--signal {args.signal}: {sig_secs} s warning is not shorter than --time {args.time}")
    L.check_world(world, tp, pp, f"--nodes {args.nodes} x {nproc} processes")
    environment = job_environment(args)
    save_dir = Path(save).resolve()
    run_name = args.run_name or save_dir.name
    log_dir = Path(args.log_dir or cfg.logging.log_dir or save_dir / "logs").resolve()
    job = L.SlurmJob(
        configs=tuple(train_args),
        run_name=run_name,
        nodes=args.nodes,
        gpus_per_node=gpus,
        nproc_per_node=nproc,
        time=args.time,
        log_dir=str(log_dir),
        workdir=os.getcwd(),
        python=sys.executable,
        signal=args.signal or L.DEFAULT_SIGNAL,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        extra_sbatch=tuple(args.sbatch_option),
        **environment,
    )
    script = L.render_sbatch(job)
    if args.dry_run:
        print(script)
        if args.chain > 1:
            print(f"# --chain {args.chain}: job 1 plain, jobs 2..{args.chain} with --dependency=afterany:<previous job id>")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path = save_dir / "slurm" / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    write_text_atomic(script_path, script, mode=0o755)
    ids = L.submit_chain(job, script_path, args.chain, save_dir)
    for i, job_id in enumerate(ids):
        dep = f" (afterany:{ids[i - 1]})" if i else ""
        print(f"submitted job {job_id}{dep}  log: {job.log_path(job_id)}")
    print(f"script: {script_path}  record: {save_dir / L.JOBS_RECORD}")
    return 0
