"""`neoxt status` pieces without training: SLURM states (fake squeue/sacct), process checks, log tails,
discovery, the table and the exit code."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from statuskit import fake_tool, use_bin, write_run

from neoxt.cli import main
from neoxt.ops import status as S

TRACEBACK_LOG = """iteration 5/10 | loss 2.0
Traceback (most recent call last):
  File "x.py", line 3, in <module>
    boom()
RuntimeError: CUDA error: an illegal memory access was encountered
srun: error: node7: task 0: Exited with exit code 1
"""


def _jobs(tmp_path, *ids):
    return [{"job_id": i, "log": str(tmp_path / "logs" / f"run-{i}.out")} for i in ids]


def test_slurm_cancelled_job_with_fresh_heartbeat_is_crashed_with_its_traceback(tmp_path, monkeypatch, capsys):
    bindir = tmp_path / "bin"
    # Job 11 was cancelled (sacct: "CANCELLED by 0"), 12 still queued behind it; squeue knows only 12.
    fake_tool(bindir, "squeue", 'echo "12|PENDING"')
    fake_tool(bindir, "sacct", 'echo "11|CANCELLED by 0"')
    use_bin(monkeypatch, bindir)
    run = write_run(tmp_path / "runs" / "exp", host="elsewhere-node", age=2.0, jobs=_jobs(tmp_path, "11", "12"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run-11.out").write_text("x" * 50_000 + "\n" + TRACEBACK_LOG)
    rc = main(["status", str(tmp_path / "runs"), "--json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert row["verdict"] == "CRASHED" and row["job_id"] == "11" and row["job_state"] == "CANCELLED"
    assert row["jobs_queued"] == 1
    assert "SLURM job 11 CANCELLED while the heartbeat says running" in row["reason"]
    assert "RuntimeError: CUDA error: an illegal memory access was encountered" in row["reason"]
    calls = (bindir / "calls.txt").read_text()
    assert "squeue -h -j 11,12" in calls and "sacct -n -P -X -j 11" in calls
    assert run.name == "exp"


def test_slurm_running_job_fresh_heartbeat_is_running_with_eta(tmp_path, monkeypatch, capsys):
    bindir = tmp_path / "bin"
    fake_tool(bindir, "squeue", 'echo "21|RUNNING"')
    use_bin(monkeypatch, bindir)
    write_run(tmp_path / "r", host="gpu-node-3", iteration=5, train_iters=10, jobs=_jobs(tmp_path, "21"))
    rc = main(["status", str(tmp_path / "r"), "--json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert rc == 0 and row["verdict"] == "RUNNING" and row["job_state"] == "RUNNING"
    assert row["percent"] == 50.0 and row["eta_s"] == pytest.approx(2.5)
    assert row["eval"] == {"valid_loss": 2.25, "valid_ppl": 9.49}
    assert row["loss"] == 2.0 and 2.0 < row["loss_smoothed"] < 3.0


def test_scheduler_absent_falls_back_to_the_heartbeat(tmp_path, monkeypatch, capsys):
    use_bin(monkeypatch, tmp_path / "empty-bin", only=True)
    (tmp_path / "empty-bin").mkdir()
    write_run(tmp_path / "a", host="gpu-node-3", age=5000, jobs=_jobs(tmp_path, "7"))
    rc = main(["status", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert rc == 1 and "STALE" in out and "7:?" in out and "no heartbeat for 83m" in out


def test_local_process_checks(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        now = time.time()
        assert S.process_alive(sleeper.pid, now)
        # A heartbeat written before this process started cannot be this process's (pid reuse).
        assert not S.process_alive(sleeper.pid, now - 3600)
        sleeper.send_signal(signal.SIGKILL)
        time.sleep(0.2)
        assert not S.process_alive(sleeper.pid, now)  # a zombie until reaped: still gone
        sleeper.wait()
        assert not S.process_alive(sleeper.pid, now)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


@pytest.mark.parametrize(
    ("hb", "job_state", "verdict"),
    [
        ({"status": "finished"}, "CANCELLED", "FINISHED"),
        ({"status": "interrupted"}, "COMPLETED", "INTERRUPTED"),
        ({"status": "failed", "reason": "TrainingStopped: x"}, None, "FAILED"),
        ({"status": "running"}, "TIMEOUT", "CRASHED"),
        ({"status": "running"}, "NODE_FAIL", "CRASHED"),
        ({"status": "running"}, "RUNNING", "RUNNING"),
        (None, "PENDING", "PENDING"),
        (None, "FAILED", "CRASHED"),
        (None, None, "UNKNOWN"),
    ],
)
def test_judge_table(hb, job_state, verdict):
    now = time.time()
    if hb is not None:
        hb = {"time": now - 1, "pid": 1, "host": "other-host", **hb}
    job = S._Job("5", job_state, 0, None)
    assert S.judge(hb, job, now, 600, "this-host")[0] == verdict


def test_last_error_line_reads_only_the_tail(tmp_path):
    log = tmp_path / "x.log"
    log.write_text(TRACEBACK_LOG.replace("RuntimeError", "ValueError") + "y" * (S.LOG_TAIL_BYTES * 4) + "\n"
                   + "[rank0]: Traceback (most recent call last):\n[rank0]:   File 'a'\n"
                   "[rank0]: torch.OutOfMemoryError: CUDA out of memory.\nmore output\n")
    assert S.last_error_line(log) == "torch.OutOfMemoryError: CUDA out of memory."
    log.write_text("all fine\nslurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-01-01 ***\n")
    assert "CANCELLED" in S.last_error_line(log)
    assert S.last_error_line(tmp_path / "missing.log") is None


def test_discovery_skips_checkpoints_and_reads_a_torn_metrics_line(tmp_path):
    write_run(tmp_path / "exp" / "a")
    write_run(tmp_path / "exp" / "b" / "nested")
    (tmp_path / "exp" / "a" / "global_step5").mkdir()
    (tmp_path / "exp" / "a" / "global_step5" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "exp" / "notarun").mkdir()
    with open(tmp_path / "exp" / "a" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')  # being written right now
    runs = S.find_runs([tmp_path / "exp"])
    assert [p.relative_to(tmp_path).as_posix() for p in runs] == ["exp/a", "exp/b/nested"]
    st = S.collect([tmp_path / "exp"])
    assert [s.name for s in st] == ["a", "b/nested"] and st[0].loss == 2.0


def test_no_runs_and_bad_path(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 0
    assert "no runs found" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and err.strip().count("\n") == 0


def test_watch_redraws_until_interrupted(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "r", host="gpu-node-3", age=5000)
    sleeps = []

    def fake_sleep(s):
        sleeps.append(s)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", fake_sleep)
    assert main(["status", str(tmp_path), "--watch", "5"]) == 1  # the last exit code, not 130
    out = capsys.readouterr().out
    assert out.count("STALE") == 2 and sleeps == [5.0, 5.0]
