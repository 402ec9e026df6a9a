"""Issue 12, acceptance 2: one run per ``save``. The lock's rules (live owner / other host refused, stale
owner taken over once), and two concurrent ``neoxt train`` on one save: one wins with complete output of
its own, the other exits 2 with one line and changes nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from neoxt.checkpoint.lock import LOCK_FILE, acquire, release, run_lock
from neoxt.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(save: Path, **owner) -> None:
    save.mkdir(parents=True, exist_ok=True)
    (save / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "started": "then", **owner}))


def test_lock_records_owner_and_is_released(tmp_path):
    with run_lock(tmp_path / "save", say=lambda s: None):
        held = json.loads((tmp_path / "save" / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["start_time"] > 0
        with pytest.raises(CheckpointError, match=f"in use by another neoxt run \\(pid {os.getpid()} on this host"):
            acquire(tmp_path / "save")
    assert not (tmp_path / "save" / LOCK_FILE).exists()


def test_live_owner_and_other_host_are_refused_and_nothing_changes(tmp_path):
    save = tmp_path / "save"
    _write_lock(save, pid=os.getppid())
    before = (save / LOCK_FILE).read_bytes()
    with pytest.raises(CheckpointError) as err:
        acquire(save)
    assert str(err.value).count("\n") == 0 and f"pid {os.getppid()}" in str(err.value) and str(save / LOCK_FILE) in str(err.value)
    _write_lock(save, pid=_dead_pid(), host="node-other-17")
    before = (save / LOCK_FILE).read_bytes()
    with pytest.raises(CheckpointError, match="on host node-other-17"):
        acquire(save)
    assert (save / LOCK_FILE).read_bytes() == before and sorted(p.name for p in save.iterdir()) == [LOCK_FILE]


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_log_line(tmp_path):
    save = tmp_path / "save"
    dead = _dead_pid()
    _write_lock(save, pid=dead)
    said = []
    owner = acquire(save, said.append)
    assert owner["pid"] == os.getpid() and json.loads((save / LOCK_FILE).read_text()) == owner
    assert len(said) == 1 and f"stale lock {save / LOCK_FILE} of pid {dead}" in said[0]
    release(save, owner)
    assert not (save / LOCK_FILE).exists()


def test_racing_takeovers_of_one_stale_lock_have_one_winner(tmp_path):
    save = tmp_path / "save"
    _write_lock(save, pid=_dead_pid())
    script = textwrap.dedent(f"""
        import sys, time
        from neoxt.checkpoint.lock import acquire
        from neoxt.errors import CheckpointError
        while time.time() < {time.time() + 1.5}:
            pass
        try:
            acquire({str(save)!r}, say=lambda s: None)
            print("won", flush=True)
            time.sleep(2)
        except CheckpointError:
            print("lost", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(6)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["lost"] * 5 + ["won"], outs


def _train_config(tmp_path: Path, corpus_dataset) -> Path:
    tok, prefix = corpus_dataset
    d = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 16,
         "max_position_embeddings": 32, "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}},
         "train_micro_batch_size_per_gpu": 2, "train_iters": 4, "checkpoint_factor": 2, "precision": "fp32",
         "train_data_paths": [prefix], "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file,
         "save": str(tmp_path / "save"), "log_interval": 1}
    path = tmp_path / "train.yml"
    path.write_text(yaml.safe_dump(d))
    return path


def _race(tmp_path: Path, cfg: Path) -> None:
    """Start two `neoxt train` (seeds 1 and 2) on one save at once; check one won and the other changed nothing."""
    save = tmp_path / "save"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
               NEOXT_PLUGINS="slow_publish", SLOW_PUBLISH="1.5")  # the winner holds the save long enough to overlap
    procs = [subprocess.Popen([sys.executable, "-m", "neoxt.cli", "train", str(cfg), "--set", f"seed={seed}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, outs)
    win, lose = (0, 1) if codes[0] == 0 else (1, 0)
    err_lines = [ln for ln in outs[lose][1].splitlines() if ln.startswith("neoxt:")]
    assert len(err_lines) == 1 and "in use by another neoxt run" in err_lines[0], outs[lose]
    assert "Traceback" not in outs[lose][1] and outs[lose][0].strip() == ""
    # The winner's output is complete and its own.
    assert (save / "latest").read_text().strip() == "global_step4"
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step2", "global_step4"]
    assert yaml.safe_load((save / "global_step4" / "config.yml").read_text())["seed"] == win + 1
    records = [json.loads(ln) for ln in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert not (save / LOCK_FILE).exists()


def test_two_concurrent_trains_on_one_save(tmp_path, corpus_dataset):
    _race(tmp_path, _train_config(tmp_path, corpus_dataset))


@pytest.mark.slow
def test_two_concurrent_trains_on_one_save_20_times(tmp_path, corpus_dataset):
    for i in range(20):
        run = tmp_path / f"r{i}"
        run.mkdir()
        _race(run, _train_config(run, corpus_dataset))
