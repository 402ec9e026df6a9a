"""`neoxt status`: one row per training run — progress, loss, speed, and whether it is still alive.

A run is judged from the files the trainer keeps small on purpose (``heartbeat.json``, the tail of
``metrics.jsonl`` and ``eval.jsonl``, ``slurm_jobs.json``), the scheduler's view of its jobs, and at
most the last few KB of its log: never a grep through gigabytes of output.

Verdicts:

- RUNNING: the heartbeat says running, is fresh, and its process (or SLURM job) is alive.
- STALE: the heartbeat says running but is older than ``--stale-after`` (hung, stopped, swapping).
- CRASHED: the heartbeat says running but its process is gone (on this host), or SLURM says the job
  ended (cancelled, failed, timed out, node failure...): nothing marked a clean exit.
- INTERRUPTED: stopped by a signal or ``exit_interval`` after saving; rerunning continues it.
- FINISHED: reached ``train_iters``.
- FAILED: stopped on an error or on a NaN (``on_nan: stop``).
- PENDING: its SLURM job is queued and training has not started; UNKNOWN: nothing to judge by.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neoxt.errors import NeoxtError
from neoxt.ops import scheduler

HEARTBEAT = "heartbeat.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
JOBS = "slurm_jobs.json"
RUN_MARKERS = (HEARTBEAT, METRICS, JOBS)
TAIL_BYTES = 64 * 1024  # of metrics.jsonl / eval.jsonl: a few hundred records, enough to smooth
LOG_TAIL_BYTES = 16 * 1024
DEFAULT_STALE_AFTER_S = 600.0
ALERT_VERDICTS = frozenset({"STALE", "CRASHED"})
_SKIP_DIRS = re.compile(r"^(global_step\d+(\.tmp.*)?|logs|slurm|wandb|tensorboard|__pycache__|\..*)$")
_ERROR_LINE = re.compile(r"(error|exception|killed|oom|out of memory|segmentation fault|cancelled)", re.I)


class StatusError(NeoxtError):
    """A path given to ``neoxt status`` does not exist."""


@dataclass(frozen=True)
class RunStatus:
    """What ``neoxt status`` shows for one run (also its ``--json`` record)."""

    name: str
    path: str
    verdict: str
    iteration: int | None = None
    train_iters: int | None = None
    percent: float | None = None
    loss: float | None = None
    loss_smoothed: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    nan_count: int | None = None
    eval: dict[str, float] = field(default_factory=dict)
    heartbeat_age_s: float | None = None
    pid: int | None = None
    host: str | None = None
    job_id: str | None = None
    job_state: str | None = None
    jobs_queued: int = 0
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- files
def read_tail(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a text file, from the first whole line; "" when it is missing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    if size > max_bytes:
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    return data.decode("utf-8", errors="replace")


def tail_records(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The JSON objects in the tail of a JSONL file (a half-written last line is skipped)."""
    out = []
    for line in read_tail(path, max_bytes).splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def smooth(values: Sequence[float | None], weight: float = 0.9) -> list[float | None]:
    """TensorBoard-style exponential moving average, debiased so the first points are not pulled to 0."""
    out: list[float | None] = []
    avg, norm = 0.0, 0.0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(None)
            continue
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def last_error_line(log: Path | None) -> str | None:
    """The exception line of the last traceback in the log's tail, else its last error-looking line."""
    if log is None:
        return None
    lines = read_tail(log, LOG_TAIL_BYTES).splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            text = re.sub(r"^\[(rank|default)\d*\]:", "", line).strip()
            if text and not line.startswith((" ", "\t")) and "Traceback" not in text and ":" in text:
                return text[:300]
    for line in reversed(lines):
        if _ERROR_LINE.search(line):
            return line.strip()[:300]
    return None


def find_runs(paths: Iterable[str | Path], max_depth: int = 4) -> list[Path]:
    """Run directories under ``paths`` (a directory holding a heartbeat, metrics or SLURM job record)."""
    found: list[Path] = []
    seen: set[Path] = set()

    def visit(d: Path, depth: int) -> None:
        if any((d / m).is_file() for m in RUN_MARKERS):
            if d.resolve() not in seen:
                seen.add(d.resolve())
                found.append(d)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not _SKIP_DIRS.match(p.name))
        except OSError:
            return
        for child in children:
            visit(child, depth + 1)

    for p in paths:
        visit(Path(p), 0)
    return found


# ---------------------------------------------------------------------------------------- processes
def _proc_state(pid: int) -> tuple[str, float] | None:
    """(state letter, start time as epoch seconds) of a local process from /proc; None when unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime = next(float(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int, heartbeat_time: float) -> bool:
    """Is the process that wrote a heartbeat at ``heartbeat_time`` still there (on this host)?

    A zombie (killed, not yet reaped) is gone; so is a process that started after the heartbeat was
    written (its pid was reused).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    state = _proc_state(pid)
    if state is None:
        return True
    letter, started = state
    return letter not in ("Z", "X") and started <= heartbeat_time + 1.0


# ---------------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class _Job:
    job_id: str | None
    state: str | None
    queued: int
    log: Path | None


def _current_job(record: dict[str, Any] | None, states: dict[str, str]) -> _Job:
    """The job the run is in now: the newest recorded job that has left the queue, else the first queued."""
    jobs = (record or {}).get("jobs") or []
    if not jobs:
        return _Job(None, None, 0, None)
    started = [j for j in jobs if states.get(str(j.get("job_id"))) not in (None, "PENDING")]
    queued = [j for j in jobs if states.get(str(j.get("job_id"))) == "PENDING"]
    cur = started[-1] if started else (queued[0] if queued else jobs[-1])
    job_id = str(cur.get("job_id"))
    log = Path(cur["log"]) if cur.get("log") else None
    return _Job(job_id, states.get(job_id), len([j for j in queued if j is not cur]), log)


def _log_for(run: Path, job: _Job) -> Path | None:
    if job.log is not None and job.log.is_file():
        return job.log
    logs = run / "logs"
    try:
        candidates = [p for p in logs.iterdir() if p.is_file() and p.suffix in (".out", ".log", ".err")]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def judge(hb: dict[str, Any] | None, job: _Job, now: float, stale_after: float, hostname: str) -> tuple[str, str | None]:
    """(verdict, reason) from the heartbeat, the SLURM job and the local process table."""
    if hb is None:
        if job.state in ("PENDING", "CONFIGURING"):
            return "PENDING", None
        if job.state in ("RUNNING", "COMPLETING"):
            return "RUNNING", "job started, no training step yet"
        if job.state in scheduler.TERMINAL_STATES and job.state != "COMPLETED":
            return "CRASHED", f"SLURM job {job.job_id} {job.state} before the first training step"
        return "UNKNOWN", "no heartbeat.json"
    status = str(hb.get("status", "running"))
    if status == "finished":
        return "FINISHED", None
    if status == "failed":
        return "FAILED", hb.get("reason")
    if status == "interrupted":
        return "INTERRUPTED", hb.get("reason")
    age = now - float(hb.get("time", 0))
    pid, host = hb.get("pid"), hb.get("host")
    alive = process_alive(pid, float(hb.get("time", now))) if isinstance(pid, int) and host == hostname else None
    # A process seen alive here outranks a recorded job that ended (the run was restarted by hand).
    if job.state in scheduler.TERMINAL_STATES and not alive:
        return "CRASHED", f"SLURM job {job.job_id} {job.state} while the heartbeat says running"
    if alive is False:
        return "CRASHED", f"process {pid} on {host} is gone without a clean exit"
    if age > stale_after:
        return "STALE", f"no heartbeat for {_fmt_age(age)} (--stale-after {_fmt_age(stale_after)})"
    return "RUNNING", None


def run_status(
    run: Path,
    name: str,
    states: dict[str, str],
    stale_after: float = DEFAULT_STALE_AFTER_S,
    now: float | None = None,
) -> RunStatus:
    """Everything ``neoxt status`` shows for the run directory ``run``."""
    now = time.time() if now is None else now
    hb = read_json(run / HEARTBEAT)
    job = _current_job(read_json(run / JOBS), states)
    verdict, reason = judge(hb, job, now, stale_after, socket.gethostname())
    if verdict in ("CRASHED", "FAILED"):
        line = last_error_line(_log_for(run, job))
        reason = f"{reason}; log: {line}" if reason and line else (reason or line)
    metrics = tail_records(run / METRICS)
    last = metrics[-1] if metrics else {}
    smoothed = smooth([m.get("loss") for m in metrics])
    iteration = (hb or {}).get("iteration", last.get("iteration"))
    total = (hb or {}).get("train_iters")
    step_s = last.get("step_time_s")
    eta = step_s * (total - iteration) if verdict == "RUNNING" and step_s and total and iteration is not None else None
    evals = tail_records(run / EVAL, 16 * 1024)
    scores = {k: v for k, v in (evals[-1] if evals else {}).items()
              if k not in ("iteration", "time", "tokens") and isinstance(v, (int, float))}
    return RunStatus(
        name=name,
        path=str(run),
        verdict=verdict,
        iteration=iteration,
        train_iters=total,
        percent=round(100.0 * iteration / total, 1) if total and iteration is not None else None,
        loss=last.get("loss"),
        loss_smoothed=smoothed[-1] if smoothed else None,
        lr=last.get("lr"),
        tokens_per_s=last.get("tokens_per_s"),
        eta_s=eta,
        nan_count=(hb or {}).get("nan_count", last.get("nan_count")),
        eval=scores,
        heartbeat_age_s=round(now - float(hb["time"]), 1) if hb and "time" in hb else None,
        pid=(hb or {}).get("pid"),
        host=(hb or {}).get("host"),
        job_id=job.job_id,
        job_state=job.state,
        jobs_queued=job.queued,
        reason=reason,
    )


def collect(paths: Sequence[str | Path], stale_after: float = DEFAULT_STALE_AFTER_S) -> list[RunStatus]:
    """The status of every run under ``paths``; SLURM is asked once for all their jobs."""
    for p in paths:
        if not Path(p).exists():
            raise StatusError(f"{p}: no such file or directory")
    runs = find_runs(paths)
    job_ids: list[str] = []
    for run in runs:
        job_ids += [str(j.get("job_id")) for j in (read_json(run / JOBS) or {}).get("jobs") or []]
    states = scheduler.job_states(job_ids) if job_ids else {}
    out = []
    for run in runs:
        base = next((Path(p) for p in paths if _is_within(run, Path(p))), run.parent)
        rel = run.resolve().relative_to(base.resolve()).as_posix() if run.resolve() != base.resolve() else run.name
        out.append(run_status(run, rel or run.resolve().name, states, stale_after))
    return out


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def exit_code(statuses: Sequence[RunStatus]) -> int:
    """1 when any run is STALE or CRASHED (for cron alerts), else 0."""
    return 1 if any(s.verdict in ALERT_VERDICTS for s in statuses) else 0


# ---------------------------------------------------------------------------------------- output
def _fmt_age(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def _fmt_num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(statuses: Sequence[RunStatus]) -> str:
    """A plain-text table, one row per run, the reason (if any) on an indented line below."""
    head = ["RUN", "VERDICT", "JOB", "ITER", "%", "LOSS", "SMOOTH", "LR", "TOK/S", "ETA", "NAN", "EVAL", "AGE"]
    body = []
    for s in statuses:
        job = "-" if s.job_id is None else f"{s.job_id}:{s.job_state or '?'}" + (f"+{s.jobs_queued}" if s.jobs_queued else "")
        it = "-" if s.iteration is None else f"{s.iteration}/{s.train_iters or '?'}"
        ev = " ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in list(s.eval.items())[:2]) or "-"
        body.append([
            s.name, s.verdict, job, it, _fmt_num(s.percent, ".1f"), _fmt_num(s.loss, ".4f"),
            _fmt_num(s.loss_smoothed, ".4f"), _fmt_num(s.lr, ".2e"), _fmt_num(s.tokens_per_s, ",.0f"),
            _fmt_age(s.eta_s), "-" if s.nan_count is None else str(s.nan_count), ev, _fmt_age(s.heartbeat_age_s),
        ])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip()]
    for s, row in zip(statuses, body):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if s.reason:
            lines.append(f"    {s.reason}")
    if not statuses:
        lines.append("(no runs found: a run directory holds heartbeat.json, metrics.jsonl or slurm_jobs.json)")
    return "\n".join(lines)
