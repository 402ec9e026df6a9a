"""A real SLURM run: `neoxt launch --slurm --chain 3` on a one-node localhost cluster (CPU, 2 ranks).

Job 1 is sent the walltime warning signal the way ``#SBATCH --signal=B:USR1@N`` delivers it (to the
batch shell, here early via ``scancel --signal=USR1 --batch`` so the test does not wait minutes for
SLURM's signal timer); it must forward it through srun and torchrun to training, which saves and
exits 0. Job 2 (afterany:1) must resume from that checkpoint and finish; job 3 (afterany:2) finds
training complete and exits 0 at once.

Needs root and Debian's slurm-wlm + munge (``scripts/ci-install-slurm.sh``); skips saying so otherwise.
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
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


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
