"""Start ``neoxt train`` on one node (torchrun) or many (an sbatch script running srun + torchrun).

Why an sbatch script and not a Python wrapper: the script is what cluster admins and users read
when something goes wrong, so everything it does is spelled out in it — the resources, the
environment block (NCCL / OFI variables for Slingshot and the like), the rendezvous on the first
node of the allocation, and the walltime signal path:

    slurmctld --(B:USR1, N s before the limit)--> batch shell --trap--> srun --> torchrun
    --(--signals-to-handle ...SIGUSR1)--> training processes (checkpoint, exit 0)

torchrun does not forward SIGUSR1 by default (its default action would kill the agent and leave
the workers to be SIGKILLed mid-checkpoint), hence ``--signals-to-handle`` and a shutdown timeout
that leaves the workers the whole warning period to write their checkpoint; torchrun runs under
``neoxt.distributed.agent`` so that such a clean stop ends the job with exit code 0.

Chaining (``--chain N``) submits the same script N times, each job ``afterany`` the previous one;
every job resumes from ``save`` and one that finds training finished exits at once (both are the
trainer's behaviour, nothing here depends on them).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neoxt.errors import NeoxtError
from neoxt.io import write_text_atomic

DEFAULT_SIGNAL = "USR1@120"
# Rendezvous port = base + job id mod 20000: two jobs sharing a head node do not collide.
MASTER_PORT_BASE = 20000
JOBS_RECORD = "slurm_jobs.json"
# Signals torchrun forwards to the workers instead of dying of them.
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
# Of those, the ones the trainer turns into "checkpoint and exit 0" (usable as --signal).
CHECKPOINT_SIGNALS = ("USR1", "TERM")

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<h>\d{1,3}):(?P<m>\d{2}):(?P<s>\d{2})$")
_SIGNAL = re.compile(r"^(?:SIG)?(?P<name>[A-Z0-9]+)@(?P<secs>\d+)$")


class LaunchError(NeoxtError):
    """A launch option is wrong (bad --env, --time, --signal) or sbatch refused the job."""


@dataclass(frozen=True)
class SlurmJob:
    """Everything the sbatch script depends on; ``render_sbatch`` is a pure function of it."""

    configs: tuple[str, ...]
    run_name: str
    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    time: str
    log_dir: str
    workdir: str
    python: str
    signal: str = DEFAULT_SIGNAL
    partition: str | None = None
    account: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cpus_per_task: int | None = None
    master_port_base: int = MASTER_PORT_BASE
    extra_sbatch: tuple[str, ...] = field(default=())
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    @property
    def log_pattern(self) -> str:
        return str(Path(self.log_dir) / f"{self.run_name}-%j.out")

    def log_path(self, job_id: str) -> str:
        return str(Path(self.log_dir) / f"{self.run_name}-{job_id}.out")


def parse_time(value: str) -> int:
    """SLURM walltime ``[D-]HH:MM:SS`` in seconds; rejects the other SLURM forms to stay unambiguous."""
    m = _TIME.match(value.strip())
    if not m:
        raise LaunchError(f"--time {value!r}: expected HH:MM:SS or D-HH:MM:SS")
    d, h, mi, s = (int(m.group(k) or 0) for k in ("d", "h", "m", "s"))
    if mi >= 60 or s >= 60:
        raise LaunchError(f"--time {value!r}: minutes and seconds must be below 60")
    total = ((d * 24 + h) * 60 + mi) * 60 + s
    if total <= 0:
        raise LaunchError(f"--time {value!r}: must be positive")
    return total


def parse_signal(value: str) -> tuple[str, int]:
    """``USR1@120`` / ``SIGUSR1@120`` -> ("USR1", 120)."""
    m = _SIGNAL.match(value.strip().upper())
    if not m:
        raise LaunchError(f"--signal {value!r}: expected SIG@SECONDS, e.g. USR1@120")
    name = m.group("name")
    if name not in CHECKPOINT_SIGNALS:
        raise LaunchError(f"--signal {value!r}: the trainer checkpoints on {' or '.join(CHECKPOINT_SIGNALS)}")
    return name, int(m.group("secs"))


def parse_env_items(items: Sequence[str], source: str = "--env") -> list[tuple[str, str]]:
    """``KEY=VAL`` strings (from --env or an env file) as pairs, blank lines and ``#`` comments skipped."""
    pairs: list[tuple[str, str]] = []
    for lineno, raw in enumerate(items, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].strip()
        key, sep, val = line.partition("=")
        key = key.strip()
        where = f"{source}:{lineno}" if source != "--env" else "--env"
        if not sep or not _ENV_KEY.match(key):
            raise LaunchError(f"{where}: expected KEY=VALUE, got {raw.strip()!r}")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
            val = val[1:-1]
        pairs.append((key, val))
    return pairs


def read_env_file(path: str) -> list[tuple[str, str]]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise LaunchError(f"--env-file {path}: {err.strerror or err}") from None
    return parse_env_items(text.splitlines(), source=path)


def _bash_double_quote(value: str) -> str:
    """Quote for bash keeping ``$VAR`` / ``${VAR}`` expansion (users write ``PATH=/x:$PATH``) but nothing
    else: backquotes and ``$(...)`` stay literal text, never a command run by the job script."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$(", "\\$(")
    return '"' + escaped + '"'


def environment_lines(
    env: Sequence[tuple[str, str]], modules: Sequence[str], setup: Sequence[str], command: str
) -> list[str]:
    """The script's environment block, then ``module load`` lines, then the user's setup lines.

    Shared by ``neoxt launch --slurm`` and ``neoxt run --slurm`` so a job runs in the same environment
    whichever started it. Modules load after the exports (a module may read them, e.g. a prefix) and
    setup lines run last, verbatim (``source venv/bin/activate``, ``ulimit -n 65536``...).
    """
    lines = [
        f"# ---- environment: extend with `{command} --env KEY=VAL` or `--env-file FILE` ----",
        "# e.g. on HPE Slingshot (libfabric CXI): FI_PROVIDER=cxi NCCL_NET='AWS Libfabric'",
        "#      NCCL_SOCKET_IFNAME=hsn FI_CXI_DISABLE_HOST_REGISTER=1 NCCL_CROSS_NIC=1",
        "export PYTHONUNBUFFERED=1",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}",
    ]
    lines += [f"export {k}={_bash_double_quote(v)}" for k, v in env]
    if modules or setup:
        lines += ["", f"# ---- modules and setup lines (`{command} --module NAME`, `--setup 'LINE'`) ----"]
        # A module that fails to load stops the job here, not later with a confusing NCCL error.
        lines += [f"module load {shlex.quote(m)} || {{ echo 'neoxt: module load {m} failed' >&2; exit 1; }}"
                  for m in modules]
        lines += list(setup)
    return lines


def check_modules(modules: Sequence[str]) -> None:
    """Module names are single words (``module load`` takes several; one per --module keeps it clear)."""
    for m in modules:
        if not m.strip() or any(c.isspace() for c in m) or "'" in m:
            raise LaunchError(f"--module {m!r}: expected one module name such as 'cuda/12.6' (repeat --module)")


def torchrun_args(
    nproc_per_node: int | str,
    configs: Sequence[str],
    *,
    nnodes: int | str = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    shutdown_timeout: int | None = None,
) -> list[str]:
    """Arguments after ``python`` that run ``neoxt train CONFIGS`` under torchrun.

    torchrun is started through ``neoxt.distributed.agent`` (same arguments), which exits 0 when a
    forwarded walltime signal made every worker save and exit 0 (plain torchrun exits 1 then).
    """
    args = ["-m", "neoxt.distributed.agent", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}"]
    if rdzv_endpoint is None:
        args.append("--standalone")
    else:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    args.append(f"--signals-to-handle={','.join(FORWARDED_SIGNALS)}")
    if shutdown_timeout is not None:
        args.append(f"--shutdown-timeout={shutdown_timeout}")
    args += ["-m", "neoxt.cli", "train", *configs]
    return args


def sbatch_header(
    written_by: str, name: str, nodes: int, gpus_per_node: int, cpus_per_task: int | None, walltime: str,
    output: str, workdir: str, partition: str | None, account: str | None, extra: Sequence[str] = (),
) -> list[str]:
    """The ``#SBATCH`` lines both ``neoxt launch`` and ``neoxt run`` write (one task per node)."""
    lines = [
        "#!/bin/bash",
        f"# Written by {written_by}. Submit with: sbatch <this file>",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if gpus_per_node > 0:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    lines += [f"#SBATCH --time={walltime}", f"#SBATCH --output={output}", f"#SBATCH --chdir={workdir}"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    return lines + [f"#SBATCH {x}" for x in extra]


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch script for ``job`` (pure: same job, same text)."""
    sig_name, sig_secs = parse_signal(job.signal)
    # Leave the workers all but a few seconds of the warning period to finish their checkpoint.
    shutdown_timeout = max(sig_secs - 10, 10)
    lines = sbatch_header(
        f"`neoxt launch --slurm` for run {job.run_name!r}", job.run_name, job.nodes, job.gpus_per_node,
        job.cpus_per_task, job.time, job.log_pattern, job.workdir, job.partition, job.account,
        # B: signals the batch shell only; the trap below forwards it down the srun/torchrun chain.
        (f"--signal=B:{sig_name}@{sig_secs}", *job.extra_sbatch),
    )
    lines += ["", "set -uo pipefail", ""]
    lines += environment_lines(job.env, job.modules, job.setup, "neoxt launch")
    lines += [
        "",
        "# ---- rendezvous on the first node of the allocation ----",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_ADDR=$head_node MASTER_PORT=${{MASTER_PORT:-$(({job.master_port_base} + SLURM_JOB_ID % 20000))}}",
        'echo "neoxt: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST],'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT, started $(date -u +%FT%TZ)"',
        "",
    ]
    quoted = [
        shlex.quote(a) if "$" not in a else f'"{a}"'
        for a in torchrun_args(
            job.nproc_per_node,
            job.configs,
            nnodes="$SLURM_JOB_NUM_NODES",
            rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT",
            rdzv_id="$SLURM_JOB_ID",
            shutdown_timeout=shutdown_timeout,
        )
    ]
    # One option per line; "-m module" pairs and the trailing "train CONFIG..." stay together.
    cmd, i = [f"{shlex.quote(job.python)} {quoted[0]} {quoted[1]}"], 2
    while i < len(quoted):
        if quoted[i] == "-m":
            cmd.append(" ".join(quoted[i:]))
            break
        cmd.append(quoted[i])
        i += 1
    lines += [
        "# ---- walltime signal: forward it to srun, which forwards it to torchrun on every node ----",
        "forward_signal() {",
        '    echo "neoxt: SIG$1 received, asking training to checkpoint and exit"',
        '    kill -s "$1" "$srun_pid" 2>/dev/null',
        "}",
        f"trap 'forward_signal {sig_name}' {sig_name}",
        "trap 'forward_signal TERM' TERM",
        "",
        # Slurm >= 22.05 no longer hands the job's --cpus-per-task to srun steps: pass it on, or
        # torchrun and all its workers would share one core.
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \\",
        "    " + " \\\n    ".join(cmd) + " &",
        "srun_pid=$!",
        "# `wait` returns early whenever a trapped signal arrives: keep waiting until srun is gone.",
        'while true; do wait "$srun_pid"; rc=$?; kill -0 "$srun_pid" 2>/dev/null || break; done',
        'echo "neoxt: job $SLURM_JOB_ID finished with exit code $rc at $(date -u +%FT%TZ)"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def sbatch_submit(script: Path, dependency: str | None = None, sbatch: str = "sbatch") -> str:
    """Submit ``script``; returns the job id (``sbatch --parsable`` prints ``id[;cluster]``)."""
    cmd = [sbatch, "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterany:{dependency}")
    cmd.append(str(script))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise LaunchError(f"{sbatch}: command not found (is this a SLURM login node?)") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{sbatch} did not answer within 120 s") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(f"sbatch refused {script}: {msg[-1] if msg else f'exit {proc.returncode}'}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise LaunchError(f"sbatch printed {proc.stdout.strip()!r}, expected a job id")
    return job_id


def record_jobs(run_dir: Path, entries: list[dict]) -> Path:
    """Append submitted jobs to ``<run_dir>/slurm_jobs.json`` (read by ``neoxt status``)."""
    path = run_dir / JOBS_RECORD
    jobs: list[dict] = []
    if path.exists():
        try:
            jobs = json.loads(path.read_text()).get("jobs", [])
        except (OSError, ValueError, AttributeError):
            jobs = []
    write_text_atomic(path, json.dumps({"jobs": jobs + entries}, indent=2) + "\n")
    return path


def submit_chain(job: SlurmJob, script_path: Path, chain: int, run_dir: Path, sbatch: str = "sbatch") -> list[str]:
    """Submit ``chain`` copies of the script, each ``afterany`` the previous; record them; return ids."""
    ids: list[str] = []
    entries: list[dict] = []
    for i in range(chain):
        dep = ids[-1] if ids else None
        job_id = sbatch_submit(script_path, dependency=dep, sbatch=sbatch)
        ids.append(job_id)
        entries.append(
            {
                "job_id": job_id,
                "chain_index": i,
                "chain_length": chain,
                "dependency": f"afterany:{dep}" if dep else None,
                "script": str(script_path),
                "log": job.log_path(job_id),
                "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "nodes": job.nodes,
                "gpus_per_node": job.gpus_per_node,
                "nproc_per_node": job.nproc_per_node,
                "time": job.time,
                "configs": list(job.configs),
            }
        )
    record_jobs(run_dir, entries)
    return ids


def check_world(world_size: int, tp: int, pp: int, where: str) -> None:
    """Fail before queueing for hours when the mesh cannot be built from this many processes."""
    if world_size % (tp * pp):
        raise LaunchError(
            f"{where}: {world_size} processes cannot be split into model_parallel_size={tp} x "
            f"pipe_parallel_size={pp} groups"
        )


@dataclass(frozen=True)
class CommandJob:
    """``neoxt run --slurm -- COMMAND``: any command on a compute node, in ``neoxt launch``'s environment."""

    command: tuple[str, ...]
    name: str
    log_dir: str
    workdir: str
    time: str = "02:00:00"
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    extra_sbatch: tuple[str, ...] = ()

    @property
    def log_pattern(self) -> str:
        return str(Path(self.log_dir) / f"{self.name}-%j.out")

    def log_path(self, job_id: str) -> str:
        return str(Path(self.log_dir) / f"{self.name}-{job_id}.out")


def render_command_sbatch(job: CommandJob) -> str:
    """The sbatch script for ``job`` (pure). One node: the command runs in the batch shell itself;
    several: under ``srun``, once per node."""
    if not job.command:
        raise LaunchError("neoxt run: no command given (write it after --, e.g. neoxt run --slurm -- nvidia-smi)")
    parse_time(job.time)
    cmd = shlex.join(job.command)
    lines = sbatch_header(
        "`neoxt run --slurm`", job.name, job.nodes, job.gpus_per_node, job.cpus_per_task, job.time,
        job.log_pattern, job.workdir, job.partition, job.account, job.extra_sbatch,
    )
    lines += ["", "set -uo pipefail", ""]
    lines += environment_lines(job.env, job.modules, job.setup, "neoxt run")
    run = cmd if job.nodes == 1 else "srun --ntasks-per-node=1 " + cmd
    lines += [
        "",
        'echo "neoxt: job $SLURM_JOB_ID on $(hostname) [$SLURM_JOB_NODELIST], started $(date -u +%FT%TZ)"',
        f"echo {shlex.quote('neoxt: running: ' + cmd)}",
        run,
        "rc=$?",
        'echo "neoxt: job $SLURM_JOB_ID finished with exit code $rc at $(date -u +%FT%TZ)"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)
