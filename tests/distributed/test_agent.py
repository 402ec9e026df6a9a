"""`python -m neoxt.distributed.agent` (torchrun that exits 0 after a clean checkpoint-signal stop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = """
import os, signal, sys, time
from pathlib import Path
code = int(sys.argv[1])
def stop(signum, frame):
    sys.exit(code)              # a trainer saves here; code != 0 simulates a failed save
signal.signal(signal.SIGUSR1, stop)
Path(sys.argv[2], os.environ["RANK"]).write_text("ready")
while True:
    time.sleep(0.05)
"""


def _run_agent(tmp_path: Path, worker_exit: int) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neoxt.distributed.agent", "--standalone", "--nproc-per-node=2",
         "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1", "--shutdown-timeout=20", str(script),
         str(worker_exit), str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 60
    while len(list(ready.iterdir())) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=60)[0]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.mark.distributed
def test_clean_stop_after_forwarded_signal_exits_zero(tmp_path):
    res = _run_agent(tmp_path, worker_exit=0)
    assert res.returncode == 0, res.stdout
    assert "SIGUSR1 forwarded to 2 training process(es); all exited 0 after saving" in res.stdout


@pytest.mark.distributed
def test_failed_stop_keeps_torchrun_failure(tmp_path):
    res = _run_agent(tmp_path, worker_exit=3)
    assert res.returncode != 0, res.stdout
    assert "all exited 0" not in res.stdout
