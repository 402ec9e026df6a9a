"""`neoxt cluster status` and `neoxt cluster usage`: the cluster's node/GPU states, your jobs and share,
and GPU-hours by user and account — from ``sinfo``, ``squeue`` and ``sacct``.

Usage is summed from ``sacct`` job records (allocated GPUs and CPUs × the part of each job's run time
inside the period), not from ``sreport``'s hourly rollups, so a job that ended a minute ago counts.
Utilisation divides by the cluster's size now (``sinfo``), which is exact unless nodes came or went.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from neoxt.ops.scheduler import SchedulerError, query, rows

_GPU_GRES = re.compile(r"gpu(?::[^:,()]+)?:(\d+)")
_TRES_GPU = re.compile(r"gres/gpu(?::[^=,]+)?=(\d+)")
_TRES_CPU = re.compile(r"(?:^|,)cpu=(\d+)")
RULE = "-" * 78


def gpus_in(gres: str) -> int:
    """GPUs in a GRES / TRES-per-node field: ``gpu:4``, ``gpu:h100:4(S:0-3)``, ``gres/gpu:4``; 0 if none."""
    m = _GPU_GRES.search(gres or "")
    return int(m.group(1)) if m else 0


def user() -> str:
    return os.environ.get("USER") or getpass.getuser()


def _table(head: Sequence[str], body: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [fmt(head), *(fmt(r) for r in body)]


# ---------------------------------------------------------------------------------------- status
@dataclass(frozen=True)
class Node:
    name: str
    state: str
    gpus: int
    cpus_alloc: int
    cpus_total: int


def nodes() -> list[Node]:
    """Every node once (``sinfo -N`` repeats a node per partition)."""
    out = query(["sinfo", "-h", "-N", "-o", "%N|%T|%G|%C"], "cluster status")
    seen: dict[str, Node] = {}
    for name, state, gres, cpus in rows(out, 4):
        parts = (cpus.split("/") + ["0"] * 4)[:4]  # allocated/idle/other/total
        alloc, total = (int(x) if x.isdigit() else 0 for x in (parts[0], parts[3]))
        seen.setdefault(name, Node(name, state.rstrip("*~#!%$@^-"), gpus_in(gres), alloc, total))
    return list(seen.values())


@dataclass(frozen=True)
class Job:
    job_id: str
    name: str
    state: str
    nodes: int
    gpus: int
    cpus: int
    elapsed: str
    limit: str
    reason: str


def my_jobs(username: str) -> list[Job]:
    out = query(["squeue", "-h", "-u", username, "-o", "%i|%j|%T|%D|%b|%C|%M|%l|%r"], "cluster status")
    jobs = []
    for job_id, name, state, n, gres, cpus, elapsed, limit, reason in rows(out, 9):
        n_nodes = int(n) if n.isdigit() else 1
        jobs.append(Job(job_id, name, state, n_nodes, gpus_in(gres) * n_nodes, int(cpus) if cpus.isdigit() else 0,
                        elapsed, limit, reason))
    return jobs


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def status_report(username: str | None = None) -> str:
    """The text of ``neoxt cluster status``."""
    username = username or user()
    all_nodes = nodes()
    jobs = my_jobs(username)
    by_state: dict[str, list[Node]] = defaultdict(list)
    for n in all_nodes:
        by_state[n.state].append(n)
    tot_n, tot_g = len(all_nodes), sum(n.gpus for n in all_nodes)
    tot_c = sum(n.cpus_total for n in all_nodes)
    body = [
        [s, str(len(ns)), _pct(len(ns), tot_n), str(sum(n.gpus for n in ns)), _pct(sum(n.gpus for n in ns), tot_g),
         str(sum(n.cpus_total for n in ns))]
        for s, ns in sorted(by_state.items(), key=lambda kv: (-sum(n.gpus for n in kv[1]), -len(kv[1]), kv[0]))
    ]
    body.append(["TOTAL", str(tot_n), _pct(tot_n, tot_n), str(tot_g), _pct(tot_g, tot_g), str(tot_c)])
    lines = ["CLUSTER NODE STATES", RULE]
    lines += _table(["State", "Nodes", "%Nodes", "GPUs", "%GPUs", "CPUs"], body, right=(1, 2, 3, 4, 5))
    for title, states in (("RUNNING", ("RUNNING", "COMPLETING")), ("PENDING", ("PENDING",))):
        mine = [j for j in jobs if j.state in states]
        lines += ["", f"MY {title} JOBS ({username})", RULE]
        if not mine:
            lines.append(f"no {title.lower()} jobs")
            continue
        head = ["Job ID", "Name", "Nodes", "GPUs", "CPUs", "Elapsed" if title == "RUNNING" else "Limit", "Reason"]
        rows_ = [[j.job_id, j.name[:40], str(j.nodes), str(j.gpus), str(j.cpus),
                  j.elapsed if title == "RUNNING" else j.limit, j.reason if title == "PENDING" else ""] for j in mine]
        rows_.append(["TOTAL", "", str(sum(j.nodes for j in mine)), str(sum(j.gpus for j in mine)),
                      str(sum(j.cpus for j in mine)), "", ""])
        lines += _table(head, rows_, right=(2, 3, 4))
    running = [j for j in jobs if j.state in ("RUNNING", "COMPLETING")]
    my_g, my_c = sum(j.gpus for j in running), sum(j.cpus for j in running)
    busy = {"ALLOCATED", "MIXED", "COMPLETING"}
    alloc_g = sum(n.gpus for n in all_nodes if n.state.upper() in busy)
    alloc_c = sum(n.cpus_alloc for n in all_nodes)
    idle_g = sum(n.gpus for n in all_nodes if n.state.upper() == "IDLE")
    lines += ["", "SUMMARY", RULE,
              f"my running GPUs:   {my_g:>6}  ({_pct(my_g, tot_g)} of cluster, {_pct(my_g, alloc_g)} of allocated)",
              f"my running CPUs:   {my_c:>6}  ({_pct(my_c, tot_c)} of cluster, {_pct(my_c, alloc_c)} of allocated)",
              f"cluster GPUs:      {tot_g:>6}  total, {alloc_g} allocated, {idle_g} idle",
              f"cluster CPUs:      {tot_c:>6}  total, {alloc_c} allocated"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- usage
def parse_when(value: str, what: str, now: dt.datetime) -> dt.datetime:
    """``YYYY-MM-DD``, ``YYYY-MM-DDTHH:MM[:SS]`` or ``now`` (local time, as sacct reads it)."""
    if value == "now":
        return now
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise SchedulerError(f"cluster usage: {what} {value!r}: expected YYYY-MM-DD[THH:MM[:SS]] or 'now'") from None


@dataclass(frozen=True)
class Usage:
    user: str
    account: str
    gpu_hours: float
    cpu_hours: float
    jobs: int


def _sacct_time(value: str, default: dt.datetime | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return default  # "Unknown" / "None": still running (end) or never started (start)


def usage(start: dt.datetime, end: dt.datetime) -> list[Usage]:
    """GPU- and CPU-hours per (user, account) of the jobs that ran between ``start`` and ``end``."""
    out = query(["sacct", "-a", "-X", "-n", "-P", "-S", start.strftime("%Y-%m-%dT%H:%M:%S"),
                 "-E", end.strftime("%Y-%m-%dT%H:%M:%S"), "-o", "JobID,User,Account,AllocTRES,Start,End"],
                "cluster usage")
    acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for _job, usr, account, tres, t0, t1 in rows(out, 6):
        began = _sacct_time(t0, None)
        if began is None:
            continue
        ended = _sacct_time(t1, end) or end
        secs = (min(ended, end) - max(began, start)).total_seconds()
        if secs <= 0:
            continue
        g, c = _TRES_GPU.search(tres), _TRES_CPU.search(tres)
        slot = acc[(usr or "?", account or "-")]
        slot[0] += (int(g.group(1)) if g else 0) * secs / 3600
        slot[1] += (int(c.group(1)) if c else 0) * secs / 3600
        slot[2] += 1
    return sorted((Usage(u, a, v[0], v[1], int(v[2])) for (u, a), v in acc.items()),
                  key=lambda x: (-x.gpu_hours, -x.cpu_hours, x.user))


def _by(items: Sequence[Usage], key: str) -> list[Usage]:
    merged: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for u in items:
        m = merged[getattr(u, key)]
        m[0] += u.gpu_hours
        m[1] += u.cpu_hours
        m[2] += u.jobs
    return sorted((Usage(k if key == "user" else "", k if key == "account" else "", v[0], v[1], int(v[2]))
                   for k, v in merged.items()), key=lambda x: (-x.gpu_hours, -x.cpu_hours))


def _usage_rows(items: Sequence[Usage], label: str, top: int) -> list[str]:
    total_g = sum(u.gpu_hours for u in items) or 0.0
    if not items:
        return ["no jobs in this period"]
    body = [[str(i), getattr(u, label), f"{u.gpu_hours:,.2f}", f"{u.gpu_hours / 24:,.2f}", _pct(u.gpu_hours, total_g),
             f"{u.cpu_hours:,.2f}", str(u.jobs)] for i, u in enumerate(items[:top], 1)]
    return _table(["Rank", label.capitalize(), "GPU-hours", "GPU-days", "%GPU", "CPU-hours", "Jobs"], body,
                  right=(0, 2, 3, 4, 5, 6))


def usage_report(start: str | None, end: str | None, top: int = 10, username: str | None = None,
                 now: dt.datetime | None = None) -> str:
    """The text of ``neoxt cluster usage [START [END]]`` (default: the last 30 days)."""
    now = now or dt.datetime.now().replace(microsecond=0)
    t0 = parse_when(start, "START", now) if start else now - dt.timedelta(days=30)
    t1 = parse_when(end, "END", now) if end else now
    if t1 <= t0:
        raise SchedulerError(f"cluster usage: END {t1:%Y-%m-%d %H:%M} is not after START {t0:%Y-%m-%d %H:%M}")
    username = username or user()
    period = usage(t0, t1)
    users, accounts = _by(period, "user"), _by(period, "account")
    lines = [f"CLUSTER USAGE  {t0:%Y-%m-%d %H:%M} to {t1:%Y-%m-%d %H:%M}", "",
             f"TOP {top} USERS", RULE, *_usage_rows(users, "user", top), "",
             f"TOP {top} ACCOUNTS", RULE, *_usage_rows(accounts, "account", top), "",
             f"MY USAGE ({username})", RULE]
    mine = next(((i, u) for i, u in enumerate(users, 1) if u.user == username), None)
    if mine is None:
        lines.append(f"no jobs of {username} in this period")
    else:
        rank, u = mine
        lines.append(f"GPU-hours {u.gpu_hours:,.2f} ({u.gpu_hours / 24:,.2f} GPU-days), CPU-hours {u.cpu_hours:,.2f}, "
                     f"{u.jobs} job(s), rank #{rank} of {len(users)}")
    week = usage(now - dt.timedelta(days=7), now)
    lines += ["", "TOP USERS, LAST 7 DAYS", RULE, *_usage_rows(_by(week, "user"), "user", top)]
    cluster_nodes = nodes()
    hours = (t1 - t0).total_seconds() / 3600
    cap_g, cap_c = sum(n.gpus for n in cluster_nodes) * hours, sum(n.cpus_total for n in cluster_nodes) * hours
    used_g, used_c = sum(u.gpu_hours for u in period), sum(u.cpu_hours for u in period)
    lines += ["", "UTILISATION (of the cluster's current size over the period)", RULE,
              f"GPU-hours used {used_g:,.2f} of {cap_g:,.2f}: {_pct(used_g, cap_g)}",
              f"CPU-hours used {used_c:,.2f} of {cap_c:,.2f}: {_pct(used_c, cap_c)}"]
    return "\n".join(lines)

