"""benchmarks/mfu.py runs end to end on CPU with --tiny (no GPU is lent to this project's tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mfu_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "mfu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "mfu.py"), "--tiny", "--steps", "2", "--warmup", "1",
         "--models", "llama-tiny", "--peak-tflops", "1.0", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["ac"] for r in rows] == [False, True]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and 0 < r["mfu"] < 1
    assert "llama-tiny" in proc.stdout and "tok/s" in proc.stdout and "MFU" in proc.stdout
