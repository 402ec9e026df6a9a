"""Peak memory of one training step with the chunked loss is at most half the plain full-logits
path's (``benchmarks/loss_memory.py`` on a small shape; each side in a fresh subprocess, measured by
the kernel's resident-set high-water mark, so the figure is memory, not time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "loss_memory.py"


def test_chunked_loss_step_uses_at_most_half_the_memory_of_plain():
    cmd = [sys.executable, str(BENCH), "--vocab", "8192", "--seq", "2048", "--hidden", "64", "--layers", "1",
           "--chunk", "256", "--sides", "chunked", "plain", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy(), check=True)
    rows = {r["side"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])}
    chunked, plain = rows["chunked"], rows["plain"]
    assert abs(chunked["loss"] - plain["loss"]) < 1e-4  # same weights, same batch, same loss
    # The step's own memory (peak minus what the process held before it) and the whole peak.
    assert chunked["step_mib"] <= 0.5 * plain["step_mib"], rows
    assert chunked["peak_mib"] < plain["peak_mib"], rows
