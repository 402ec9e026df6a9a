"""Issue 12, acceptance 5 and "Why" items 6/10: a stale ``WORLD_SIZE`` with no peer ends within the
start-up timeout with one line naming the missing ranks and the env vars; SIGTERM ends the wait at
once; ``--nproc-per-node 0`` is refused instead of silently replaced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from neoxt.cli import main

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path: Path, corpus_dataset, startup_timeout: float) -> subprocess.Popen:
    tok, prefix = corpus_dataset
    cfg = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 16,
           "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "train_iters": 1,
           "train_data_paths": [prefix], "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file,
           "save": str(tmp_path / "run"), "dist_startup_timeout_s": startup_timeout}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), WORLD_SIZE="2", RANK="0",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    return subprocess.Popen([sys.executable, "-m", "neoxt.cli", "train", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("neoxt:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_stale_world_size_exits_within_the_startup_timeout(tmp_path, corpus_dataset):
    proc = _start(tmp_path, corpus_dataset, startup_timeout=3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    line = _error_line(err)
    assert "rank(s) [1] of WORLD_SIZE=2 did not join within 3 s" in line and "MASTER_PORT=" in line, line
    assert not (tmp_path / "run" / "neoxt.lock").exists()  # the lock was released, nothing else written


def test_sigterm_ends_the_wait_at_once(tmp_path, corpus_dataset):
    proc = _start(tmp_path, corpus_dataset, startup_timeout=600)
    deadline = time.time() + 120
    seen = ""
    while "waiting up to" not in seen:  # the rendezvous log line: the process is now in the wait
        assert time.time() < deadline and proc.poll() is None, seen
        seen += proc.stderr.readline()
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 5
    assert proc.returncode == 2
    assert "received SIGTERM while waiting for the other ranks" in _error_line(seen + err)


@pytest.mark.parametrize("flag", ["--nproc-per-node", "--nodes"])
def test_zero_processes_or_nodes_is_refused(tmp_path, capsys, flag):
    cfg = tmp_path / "c.yml"
    cfg.write_text("num_layers: 1\nhidden_size: 8\nnum_attention_heads: 2\ntrain_iters: 1\nsave: run\n")
    args = ["launch", str(cfg), flag, "0"] + (["--slurm", "--dry-run"] if flag == "--nodes" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"neoxt: {flag} must be at least 1, got 0" in err and "Traceback" not in err
