"""Helpers for the ops tests: fake SLURM commands on PATH and hand-written run directories."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


def fake_tool(bindir: Path, name: str, body: str) -> Path:
    """An executable ``name`` in ``bindir`` running the bash ``body`` (its calls logged to calls.txt)."""
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / name
    path.write_text(f'#!/bin/bash\necho "{name} $*" >> {bindir / "calls.txt"}\nCALLER_PATH=$PATH; export PATH=/usr/bin:/bin\n{body}\n')
    path.chmod(0o755)
    return path


def use_bin(monkeypatch, bindir: Path, only: bool = False) -> None:
    """Put ``bindir`` first on PATH (``only``: nothing else, so real SLURM tools here are hidden)."""
    monkeypatch.setenv("PATH", str(bindir) if only else f"{bindir}{os.pathsep}{os.environ['PATH']}")


def write_run(run: Path, *, status: str = "running", iteration: int = 5, train_iters: int = 10, age: float = 1.0,
              pid: int | None = None, host: str | None = None, jobs: list[dict] | None = None,
              losses: tuple[float, ...] = (3.0, 2.5, 2.0), **extra) -> Path:
    """A run directory as the trainer leaves it: heartbeat.json, metrics.jsonl, eval.jsonl, slurm_jobs.json."""
    run.mkdir(parents=True, exist_ok=True)
    now = time.time()
    hb = {"iteration": iteration, "train_iters": train_iters, "time": now - age, "pid": pid or os.getpid(),
          "host": host or socket.gethostname(), "status": status, "nan_count": 0, **extra}
    (run / "heartbeat.json").write_text(json.dumps(hb))
    recs = [{"iteration": iteration - len(losses) + 1 + i, "loss": x, "lr": 1e-3, "grad_norm": 0.5,
             "tokens_per_s": 1000.0, "step_time_s": 0.5, "nan_count": 0, "time": now - age}
            for i, x in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "eval.jsonl").write_text(json.dumps({"iteration": iteration, "valid_loss": 2.25, "valid_ppl": 9.49,
                                                "tokens": 64, "time": now}) + "\n")
    if jobs is not None:
        (run / "slurm_jobs.json").write_text(json.dumps({"jobs": jobs}))
    return run
