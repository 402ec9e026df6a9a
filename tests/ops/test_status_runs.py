"""Acceptance 1 of the operate issue: `neoxt status` over real `neoxt train` runs that ended every way a
run ends — finished, kill -9 mid-training, SIGSTOP past --stale-after, SIGTERM, on_nan: stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "distributed"))

from launchkit import write_train_config  # noqa: E402

from neoxt.cli import main  # noqa: E402

REPO = HERE.parents[1]
STALE_AFTER = 3.0


def _train(cfg: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "neoxt.cli", "train", str(cfg)], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _heartbeat(run: Path) -> dict:
    try:
        return json.loads((run / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_until(pred, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(p.read_text()[-2000:] for p in logs))
        time.sleep(0.1)


def _last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_status_verdicts_over_real_runs(tmp_path, tiny_tokenizer_dir, corpus, capsys):
    runs = tmp_path / "runs"
    common = {"log_interval": 1}
    cfgs = {}
    for name, iters, extra in (
        ("finished", 6, {}),
        ("killed", 10**6, {}),
        ("stopped", 10**6, {}),
        ("sigterm", 10**6, {}),
        # lr 1e30: the first step blows the weights up, the second step's loss is not finite.
        ("nan", 50, {"on_nan": "stop", "optimizer": {"type": "Adam", "params": {"lr": 1.0e30}}}),
    ):
        root = tmp_path / "src" / name
        root.mkdir(parents=True)
        cfg, _ = write_train_config(root, tiny_tokenizer_dir, corpus, iters, run_name=name, **common, **extra,
                                    save=str(runs / name))
        cfgs[name] = cfg
    logs = {n: runs / n / "logs" / "train.log" for n in cfgs}
    # The runs that must be killed or stopped are processes of their own; the two that end by themselves
    # run in this process meanwhile (no second torch start-up on a busy machine).
    procs = {n: _train(cfgs[n], logs[n]) for n in ("killed", "stopped", "sigterm")}
    try:
        assert main(["train", str(cfgs["finished"])]) == 0
        assert main(["train", str(cfgs["nan"])]) == 2
        capsys.readouterr()
        for name in ("killed", "stopped", "sigterm"):
            _wait_until(lambda n=name: _heartbeat(runs / n).get("iteration", 0) >= 3, 240, f"{name} to train",
                        [logs[name]])
        procs["killed"].send_signal(signal.SIGKILL)
        procs["killed"].wait(30)
        procs["sigterm"].send_signal(signal.SIGTERM)
        assert procs["sigterm"].wait(120) == 0, logs["sigterm"].read_text()
        procs["stopped"].send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        killed_hb = _heartbeat(runs / "killed")
        time.sleep(max(0.0, STALE_AFTER + 0.5 - (time.time() - _heartbeat(runs / "stopped")["time"])))

        rc = main(["status", str(runs), "--stale-after", str(STALE_AFTER), "--json"])
        out = capsys.readouterr().out
        assert time.time() - stopped_at < 60
        rows = {r["name"]: r for r in json.loads(out)}
        assert rc == 1  # a STALE and a CRASHED run: cron should alert
        assert {n: r["verdict"] for n, r in rows.items()} == {
            "finished": "FINISHED", "killed": "CRASHED", "stopped": "STALE", "sigterm": "INTERRUPTED", "nan": "FAILED",
        }
        for name, row in rows.items():
            hb, last = _heartbeat(runs / name), _last_metrics(runs / name)
            assert row["iteration"] == hb["iteration"], name
            assert row["loss"] == last["loss"], name
        assert rows["finished"]["iteration"] == 6 and rows["finished"]["percent"] == 100.0
        assert rows["killed"]["iteration"] == killed_hb["iteration"] >= 3
        assert f"process {killed_hb['pid']}" in rows["killed"]["reason"] and "gone" in rows["killed"]["reason"]
        assert "no heartbeat for" in rows["stopped"]["reason"]
        assert rows["nan"]["iteration"] == 1 and rows["nan"]["nan_count"] == 1
        assert "non-finite loss at iteration 2" in rows["nan"]["reason"]
        assert rows["finished"]["loss_smoothed"] is not None and rows["finished"]["tokens_per_s"] > 0

        # The table: one row per run, the verdicts and the reasons below the rows that have one.
        rc = main(["status", str(runs), "--stale-after", str(STALE_AFTER)])
        table = capsys.readouterr().out
        assert rc == 1
        for name, verdict in (("finished", "FINISHED"), ("killed", "CRASHED"), ("stopped", "STALE")):
            line = next(x for x in table.splitlines() if x.startswith(name + " "))
            assert verdict in line
        assert "6/6" in table and "non-finite loss" in table

        # Without the two alerting runs the exit code is 0.
        rc = main(["status", str(runs / "finished"), str(runs / "sigterm"), str(runs / "nan")])
        capsys.readouterr()
        assert rc == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
