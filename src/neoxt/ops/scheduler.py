"""Asking SLURM (squeue, sacct, scontrol, sinfo) with a timeout, as plain rows.

``neoxt status`` and ``neoxt cluster`` read scheduler state only through here, so a missing command,
a controller that does not answer, or accounting that is switched off is one ``SchedulerError`` line
instead of a traceback, and the parsing of SLURM's ``|``-separated output lives in one place.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from neoxt.errors import NeoxtError

TIMEOUT_S = 30
# States after which a job will not run again (sacct prints "CANCELLED by 123": the first word counts).
TERMINAL_STATES = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})


class SchedulerError(NeoxtError):
    """SLURM is not installed here, does not answer, or has no accounting for what was asked."""


def available(tool: str = "squeue") -> bool:
    return shutil.which(tool) is not None


def query(cmd: Sequence[str], what: str) -> str:
    """stdout of ``cmd``; a one-line ``SchedulerError`` naming ``what`` when it cannot be had."""
    if shutil.which(cmd[0]) is None:
        raise SchedulerError(f"{what}: `{cmd[0]}` not found (SLURM is not installed on this machine)")
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{what}: `{cmd[0]}` did not answer within {TIMEOUT_S} s") from None
    text = (proc.stderr or "") + (proc.stdout or "")
    if "accounting storage is disabled" in text.lower():
        raise SchedulerError(
            f"{what}: SLURM accounting is disabled on this cluster (AccountingStorageType=accounting_storage/none);"
            " sacct needs slurmdbd"
        )
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
        raise SchedulerError(f"{what}: {cmd[0]} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def rows(text: str, fields: int) -> list[list[str]]:
    """``|``-separated lines (squeue -o 'a|b', sacct -P) with exactly ``fields`` columns."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) >= fields:
            # A job name may itself hold "|": the extra pieces belong to the name column (the second).
            extra = len(parts) - fields
            if extra:
                parts = [parts[0], "|".join(parts[1 : 2 + extra]), *parts[2 + extra :]]
            out.append([p.strip() for p in parts])
    return out


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """job id -> state (RUNNING, PENDING, COMPLETED, CANCELLED, ...) for the jobs SLURM still knows.

    squeue answers for queued and running jobs; sacct (when accounting is on) for finished ones,
    else ``scontrol show job`` while the controller still remembers them (MinJobAge, 5 min by default).
    A job no source knows is left out.
    """
    ids = [j for j in job_ids if j]
    if not ids or not available("squeue"):
        return {}
    states: dict[str, str] = {}
    try:
        out = query(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T"], "squeue")
        states.update({i: s for i, s in rows(out, 2)})
    except SchedulerError:
        pass  # squeue refuses ids it no longer knows ("Invalid job id specified"); ask the others
    rest = [j for j in ids if j not in states]
    if rest and available("sacct"):
        try:
            out = query(["sacct", "-n", "-P", "-X", "-j", ",".join(rest), "-o", "JobID,State"], "sacct")
            for job_id, state in rows(out, 2):
                if job_id in rest:
                    states[job_id] = state.split()[0] if state else "UNKNOWN"
        except SchedulerError:
            pass
    for job_id in [j for j in rest if j not in states]:
        try:
            out = query(["scontrol", "-o", "show", "job", job_id], "scontrol")
        except SchedulerError:
            continue
        for tok in out.split():
            if tok.startswith("JobState="):
                states[job_id] = tok.split("=", 1)[1]
    return states
