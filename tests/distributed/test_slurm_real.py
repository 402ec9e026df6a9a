"""Real SLURM runs on a one-node localhost cluster: `neoxt launch --slurm --chain 3` (CPU, 2 ranks),
`neoxt status` on SLURM jobs, `neoxt cluster status|usage` (sacct through slurmdbd + MariaDB when
installed), `neoxt run --slurm -- COMMAND`.

Job 1 is sent the walltime warning signal the way ``#SBATCH --signal=B:USR1@N`` delivers it (to the
batch shell, here early via ``scancel --signal=USR1 --batch`` so the test does not wait minutes for
SLURM's signal timer); it must forward it through srun and torchrun to training, which saves and
exits 0. Job 2 (afterany:1) must resume from that checkpoint and finish; job 3 (afterany:2) finds
training complete and exits 0 at once.

Needs root and Debian's slurm-wlm + munge (``scripts/ci-install-slurm.sh``); skips saying so otherwise.
Accounting (slurmdbd + mariadb-server, installed by the same script) is used when present; without it
the usage test checks the one-line error instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from launchkit import write_train_config  # noqa: E402
from slurm_cluster import missing_tools, slurm_cluster  # noqa: E402

from neoxt.cli import main  # noqa: E402

REPO = HERE.parents[1]
TRAIN_ITERS = 600


def _skip_reason() -> str | None:
    missing = missing_tools()
    if missing:
        return f"SLURM test needs {', '.join(missing)} (run scripts/ci-install-slurm.sh as root)"
    if os.geteuid() != 0:
        return "SLURM test starts slurmctld/slurmd/munged and needs root"
    return None


pytestmark = [pytest.mark.distributed, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), accounting=not missing_tools(accounting=True)) as c:
        yield c


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """In-process `neoxt ...` calls talk to the test cluster."""
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    return cluster


def _wait_gone(cluster, ids: list[str], timeout: float) -> None:
    deadline = time.time() + timeout
    while cluster.active_jobs(ids):
        assert time.time() < deadline, "jobs still queued/running: " + " ".join(cluster.active_jobs(ids))
        time.sleep(0.5)


def _heartbeat(run: Path) -> int:
    try:
        return json.loads((run / "heartbeat.json").read_text())["iteration"]
    except (OSError, ValueError, KeyError):
        return -1


def test_chained_jobs_signal_resume_and_finish(cluster, tmp_path, tiny_tokenizer_dir, corpus):
    cfg, run = write_train_config(tmp_path, tiny_tokenizer_dir, corpus, TRAIN_ITERS)
    launch = subprocess.run(
        [sys.executable, "-m", "neoxt.cli", "launch", "--slurm", str(cfg), "--nodes", "1", "--gpus-per-node", "0",
         "--nproc-per-node", "2", "--cpus-per-task", "2", "--time", "00:10:00", "--signal", "USR1@90", "--chain", "3",
         "--env", "NEOXT_TEST_MARKER=chained run", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=60,
    )
    assert launch.returncode == 0, launch.stdout + launch.stderr
    ids = re.findall(r"submitted job (\d+)", launch.stdout)
    assert len(ids) == 3, launch.stdout
    logs = [tmp_path / "logs" / f"run-{i}.out" for i in ids]
    assert all(str(p) in launch.stdout for p in logs)
    record = json.loads((run / "slurm_jobs.json").read_text())["jobs"]
    assert [j["job_id"] for j in record] == ids
    assert [j["dependency"] for j in record] == [None, f"afterany:{ids[0]}", f"afterany:{ids[1]}"]
    assert "afterany:" + ids[0] in cluster.run("scontrol", "show", "job", ids[1]).stdout.replace("(unfulfilled)", "")

    # Job 1 trains; then the walltime warning arrives at its batch shell.
    deadline = time.time() + 300
    while _heartbeat(run) < 5:
        assert time.time() < deadline, "job 1 did not start training:\n" + (logs[0].read_text() if logs[0].exists() else "")
        time.sleep(0.1)
    sig = cluster.run("scancel", "--signal=USR1", "--batch", ids[0])
    assert sig.returncode == 0, sig.stderr

    deadline = time.time() + 480
    while cluster.active_jobs(ids):
        assert time.time() < deadline, "jobs still queued/running: " + " ".join(cluster.active_jobs(ids))
        time.sleep(0.5)

    out1, out2, out3 = (p.read_text() for p in logs)
    assert "SIGUSR1 received, asking training to checkpoint and exit" in out1, out1
    assert "SIGUSR1 forwarded to 2 training process(es); all exited 0 after saving" in out1, out1
    m = re.search(r"received signal SIGUSR1: saved at iteration (\d+)", out1)
    assert m, out1
    saved = int(m.group(1))
    assert 5 <= saved < TRAIN_ITERS
    assert f"resuming from {run / f'global_step{saved}'}" in out2, out2
    assert (run / "latest").read_text().strip() == f"global_step{TRAIN_ITERS}"
    assert f"global_step{TRAIN_ITERS}" in out3 and "exit code 0" in out3, out3
    for job_id, out in zip(ids, (out1, out2, out3)):
        assert f"job {job_id} finished with exit code 0" in out, out
        assert cluster.job_state(job_id) in ("COMPLETED", "UNKNOWN"), cluster.job_state(job_id)


@pytest.mark.slow
def test_walltime_signal_timer_checkpoints_before_the_limit(cluster, tmp_path, tiny_tokenizer_dir, corpus):
    """SLURM's own timer: --time 3 min, --signal USR1@90 (SLURM sends it up to ~60 s early). The job
    must save and end COMPLETED (exit 0) before the limit, never be killed by it."""
    cfg, run = write_train_config(tmp_path, tiny_tokenizer_dir, corpus, 10**6)
    launch = subprocess.run(
        [sys.executable, "-m", "neoxt.cli", "launch", "--slurm", str(cfg), "--gpus-per-node", "0",
         "--nproc-per-node", "1", "--time", "00:03:00", "--signal", "USR1@90"],
        capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=60,
    )
    assert launch.returncode == 0, launch.stdout + launch.stderr
    (job_id,) = re.findall(r"submitted job (\d+)", launch.stdout)
    t0 = time.time()
    while cluster.active_jobs([job_id]):
        assert time.time() - t0 < 300, "job outlived its time limit"
        time.sleep(1)
    log = (run / "logs" / f"run-{job_id}.out").read_text()
    assert "SIGUSR1 received" in log and "received signal SIGUSR1: saved at iteration" in log, log
    assert f"job {job_id} finished with exit code 0" in log, log
    assert "DUE TO TIME LIMIT" not in log
    assert cluster.job_state(job_id) == "COMPLETED"
    assert (run / "latest").exists()


def _status(capsys, *paths: Path) -> tuple[int, dict[str, dict]]:
    rc = main(["status", *map(str, paths), "--json"])
    return rc, {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_status_of_slurm_jobs_killed_and_cancelled(on_cluster, tmp_path, tiny_tokenizer_dir, corpus, capsys):
    """`neoxt status` judges SLURM runs by SLURM's state: a job whose training step is killed outright
    (`scancel --signal=KILL <job>.0`: no SIGTERM, no save, as when a node or the OOM killer takes it) while
    its heartbeat is fresh is CRASHED from SLURM's state with the log's last error line; a job cancelled
    with a plain `scancel` gets SIGTERM, saves, and is INTERRUPTED."""
    runs, ids = tmp_path / "runs", {}
    for name in ("killed", "cancelled"):
        (tmp_path / name).mkdir()
        cfg, _ = write_train_config(tmp_path / name, tiny_tokenizer_dir, corpus, 10**6, run_name=name,
                                    save=str(runs / name), log_interval=1)
        launch = subprocess.run(
            [sys.executable, "-m", "neoxt.cli", "launch", "--slurm", str(cfg), "--gpus-per-node", "0",
             "--nproc-per-node", "1", "--cpus-per-task", "1", "--time", "00:10:00", "--log-dir", str(tmp_path / "logs")],
            capture_output=True, text=True, env=on_cluster.env, cwd=REPO, timeout=60,
        )
        assert launch.returncode == 0, launch.stdout + launch.stderr
        (ids[name],) = re.findall(r"submitted job (\d+)", launch.stdout)
    deadline = time.time() + 300
    while min(_heartbeat(runs / n) for n in ids) < 3:
        assert time.time() < deadline, "jobs did not start training: " + str({n: _heartbeat(runs / n) for n in ids})
        time.sleep(0.2)
    rc, rows = _status(capsys, runs)
    assert rc == 0 and {n: (r["verdict"], r["job_state"]) for n, r in rows.items()} == {
        "killed": ("RUNNING", "RUNNING"), "cancelled": ("RUNNING", "RUNNING")}

    assert on_cluster.run("scancel", "--signal=KILL", f"{ids['killed']}.0").returncode == 0
    assert on_cluster.run("scancel", ids["cancelled"]).returncode == 0
    _wait_gone(on_cluster, list(ids.values()), 120)
    rc, rows = _status(capsys, runs)
    assert rc == 1
    killed, cancelled = rows["killed"], rows["cancelled"]
    hb = json.loads((runs / "killed" / "heartbeat.json").read_text())
    assert hb["status"] == "running" and killed["heartbeat_age_s"] < 600  # fresh: only SLURM knows it is dead
    assert killed["verdict"] == "CRASHED" and killed["job_id"] == ids["killed"]
    assert killed["job_state"] in ("FAILED", "CANCELLED"), killed
    assert f"SLURM job {ids['killed']} {killed['job_state']} while the heartbeat says running" in killed["reason"]
    assert "log: " in killed["reason"] and "Killed" in killed["reason"], killed["reason"]
    assert killed["iteration"] == hb["iteration"] >= 3
    assert cancelled["verdict"] == "INTERRUPTED" and cancelled["job_state"] == "CANCELLED", cancelled
    assert (runs / "cancelled" / "latest").exists()


def test_cluster_status_and_usage(on_cluster, tmp_path, capsys):
    """Acceptance 4: both reports on the real cluster (usage through slurmdbd), one-line error without it."""
    done = on_cluster.run("sbatch", "--parsable", "--job-name=probe-done", f"--chdir={tmp_path}", "--wrap", "sleep 1")
    busy = on_cluster.run("sbatch", "--parsable", "--job-name=probe-busy", f"--chdir={tmp_path}", "--wrap", "sleep 60")
    done_id, busy_id = done.stdout.strip(), busy.stdout.strip()
    try:
        deadline = time.time() + 60
        while on_cluster.job_state(busy_id) != "RUNNING" or on_cluster.active_jobs([done_id]):
            assert time.time() < deadline, on_cluster.job_state(busy_id)
            time.sleep(0.3)
        assert main(["cluster", "status"]) == 0
        out = capsys.readouterr().out
        assert "CLUSTER NODE STATES" in out and "TOTAL" in out
        states = out.split("MY RUNNING JOBS")[0]
        assert any(x.split()[:2] in (["mixed", "1"], ["allocated", "1"]) for x in states.splitlines()), out
        running = out.split("MY RUNNING JOBS")[1].split("MY PENDING JOBS")[0]
        assert f"{busy_id} " in running and "probe-busy" in running
        assert f"my running CPUs:        1  ({100 / (os.cpu_count() or 1):.1f}% of cluster" in out
    finally:
        on_cluster.run("scancel", busy_id)
    if not on_cluster.accounting:
        assert main(["cluster", "usage"]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and "accounting is disabled" in err
        pytest.skip("cluster usage tables need slurmdbd + mariadb-server (scripts/ci-install-slurm.sh); "
                    "checked the one-line error instead")
    today = time.strftime("%Y-%m-%d")
    deadline = time.time() + 60
    while True:  # slurmctld hands finished jobs to slurmdbd asynchronously
        rc = main(["cluster", "usage", today, "now"])
        out = capsys.readouterr().out
        if rc == 0 and "no jobs in this period" not in out.split("TOP 10 ACCOUNTS")[0]:
            break
        assert time.time() < deadline, out
        time.sleep(1)
    users = out.split("TOP 10 USERS")[1].split("TOP 10 ACCOUNTS")[0]
    me = os.environ.get("USER") or __import__("getpass").getuser()
    assert me in users
    assert f"MY USAGE ({me})" in out and "rank #1 of 1" in out
    assert "TOP USERS, LAST 7 DAYS" in out and "GPU-hours used 0.00" in out and "CPU-hours used" in out


def test_run_command_on_the_cluster(on_cluster, tmp_path):
    """Acceptance 5: `neoxt run --slurm -- python -c 'print(42)'` runs as a job; its log holds 42. The
    job gets launch's environment: a `module` and a setup line run first."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "module").write_text('#!/bin/bash\necho "module says: $*"\n')
    (fake / "module").chmod(0o755)
    env = dict(on_cluster.env, PATH=f"{fake}:{Path(sys.executable).parent}:{on_cluster.env['PATH']}")
    sub = subprocess.run(
        [sys.executable, "-m", "neoxt.cli", "run", "--slurm", "--log-dir", str(tmp_path / "logs"),
         "--module", "ofi-nccl/1.0", "--setup", "echo setup line ran", "--", "python", "-c", "print(42)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert sub.returncode == 0, sub.stdout + sub.stderr
    (job_id,) = re.findall(r"submitted job (\d+)", sub.stdout)
    log = tmp_path / "logs" / f"neoxt-run-{job_id}.out"
    assert f"log: {log}" in sub.stdout
    _wait_gone(on_cluster, [job_id], 120)
    lines = log.read_text().splitlines()
    assert "42" in lines, lines
    assert lines.index("module says: load ofi-nccl/1.0") < lines.index("setup line ran") < lines.index("42")
    assert f"neoxt: job {job_id} finished with exit code 0" in lines[-1]
    assert on_cluster.job_state(job_id) == "COMPLETED"
