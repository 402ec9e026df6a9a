"""A hung rank ends a 2-rank `neoxt launch` within ``step_timeout_s`` (plus start-up), with the step
watchdog's one line from the rank left waiting, instead of after ``dist_timeout_s`` (here 600 s).

Before that, the checkpoint save at iteration 2 takes longer than ``step_timeout_s`` (``slow_publish.py``)
and must not fire it. Rank 1 then hangs at the start of iteration 3 (``hang_rank.py``, holding the GIL so
its own watchdog cannot fire): rank 0 waits in the step's all-reduce until its watchdog exits it (code 124), torchrun tears
down rank 1, and ``neoxt status`` shows the run FAILED with the watchdog's reason, not RUNNING.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from launchkit import write_train_config  # noqa: E402

REPO = HERE.parents[1]
STEP_TIMEOUT_S = 3
LIMIT_S = 180  # the whole launch, start-up included, on a loaded machine
pytestmark = [pytest.mark.distributed]


def test_a_hung_rank_ends_the_job_with_the_watchdog_line(tmp_path, tiny_tokenizer_dir, corpus):
    from neoxt.ops.status import run_status
    from neoxt.train.watchdog import EXIT_CODE

    cfg, run = write_train_config(tmp_path, tiny_tokenizer_dir, corpus, 8, train_batch_size=4, log_interval=1,
                                  padded_vocab_size=512, step_timeout_s=STEP_TIMEOUT_S, dist_timeout_s=600,
                                  checkpoint_factor=2)
    plugins = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": plugins,
           "NEOXT_PLUGINS": "hang_rank,slow_publish", "HANG_RANK": "1@3", "SLOW_PUBLISH": f"{STEP_TIMEOUT_S + 2}@2"}
    proc = subprocess.Popen([sys.executable, "-m", "neoxt.cli", "launch", str(cfg), "--nproc-per-node", "2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killer = threading.Timer(LIMIT_S, os.killpg, (proc.pid, signal.SIGKILL))  # a broken watchdog: no 600 s wait
    killer.start()
    hung_at = None
    lines = []
    try:
        for line in proc.stdout:  # until the launcher exits
            lines.append(line)
            if "hang_rank: rank 1 hangs at iteration 3" in line:
                hung_at = time.monotonic()
        proc.wait(timeout=60)
    finally:
        killer.cancel()
    ended = time.monotonic()
    out = "".join(lines)
    assert proc.returncode != 0 and hung_at is not None, out[-4000:]
    assert f"step watchdog: a rank whose step makes no progress for {STEP_TIMEOUT_S} s exits" in out
    line = next((ln for ln in out.splitlines() if "neoxt watchdog: rank 0 of 2" in ln), None)
    assert line is not None, out[-4000:]
    assert "in iteration 3 (training step)" in line and "other ranks' logs" in line and "step_timeout_s" in line
    # within step_timeout_s plus slack (poll, stack dump, torchrun's teardown), far below dist_timeout_s
    assert ended - hung_at < STEP_TIMEOUT_S + 20, (ended - hung_at, out[-4000:])
    # the save of iteration 2 outlasted step_timeout_s and completed: the watchdog fired only after it
    assert "saved checkpoint" in out and out.index("saved checkpoint") < out.index(line), out[-4000:]
    assert (run / "latest").read_text().strip() == "global_step2"
    assert re.search(rf"exitcode\s*:\s*{EXIT_CODE}\b", out), out[-4000:]  # torchrun's summary of rank 0
    assert "most recent call first" in out  # rank 0's stacks
    beat = json.loads((run / "heartbeat.json").read_text())
    assert beat["status"] == "failed" and beat["iteration"] == 2, beat
    status = run_status(run, "run", {})
    assert status.verdict == "FAILED" and "watchdog: rank 0" in status.reason, status
