"""`neoxt cluster status|usage` on canned sinfo/squeue/sacct output, and the one-line errors without
SLURM or without accounting (the real cluster run is in tests/distributed/test_slurm_real.py)."""

from __future__ import annotations

import pytest
from statuskit import fake_tool, use_bin

from neoxt.cli import main

SINFO = """n1|idle|gpu:h100:4(S:0-3)|0/64/0/64
n2|allocated|gpu:4|64/0/0/64
n2|allocated|gpu:4|64/0/0/64
n3|mixed|gpu:4|32/32/0/64
n4|down*|gpu:4|0/0/64/64"""
SQUEUE = """101|train-a|RUNNING|2|gres/gpu:4|128|1:00:00|1-00:00:00|None
102|train-b|PENDING|4|gres/gpu:4|256|0:00|1-00:00:00|Priority"""
SACCT = """1|alice|proj|billing=4,cpu=8,gres/gpu=4,mem=1G,node=1|2026-11-30T10:00:00|2026-11-30T12:00:00
2|bob|proj|cpu=4,gres/gpu:h100=2,node=1|2026-11-30T11:00:00|Unknown
3|me|other|cpu=2,node=1|2026-11-30T08:00:00|2026-11-30T09:00:00
4|carol|proj|cpu=2|None|Unknown"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    fake_tool(bindir, "sinfo", f"cat <<'X'\n{SINFO}\nX")
    fake_tool(bindir, "squeue", f"cat <<'X'\n{SQUEUE}\nX")
    fake_tool(bindir, "sacct", f"cat <<'X'\n{SACCT}\nX")
    use_bin(monkeypatch, bindir, only=True)
    return bindir


def test_cluster_status_tables(fake_slurm, capsys):
    assert main(["cluster", "status", "--user", "me"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    states = out.split("MY RUNNING JOBS")[0].splitlines()
    row = {x.split()[0]: x.split()[1:] for x in states if x and x.split()[0] in ("idle", "allocated", "mixed", "down", "TOTAL")}
    assert row["allocated"][:4] == ["1", "25.0%", "4", "25.0%"]  # n2 counted once, not per partition
    assert row["TOTAL"][:4] == ["4", "100.0%", "16", "100.0%"]
    assert "MY RUNNING JOBS (me)" in out and "MY PENDING JOBS (me)" in out
    run = next(x for x in lines if x.startswith("101 "))
    assert run.split()[1:5] == ["train-a", "2", "8", "128"]
    pend = next(x for x in lines if x.startswith("102 "))
    assert pend.split()[-1] == "Priority" and pend.split()[3] == "16"
    assert "my running GPUs:        8  (50.0% of cluster, 100.0% of allocated)" in out
    assert "squeue -h -u me" in (fake_slurm / "calls.txt").read_text()


def test_cluster_usage_tables(fake_slurm, capsys):
    assert main(["cluster", "usage", "2026-11-30", "2026-11-30T13:00", "--user", "me"]) == 0
    out = capsys.readouterr().out
    assert "CLUSTER USAGE  2026-11-30 00:00 to 2026-11-30 13:00" in out
    users = out.split("TOP 10 USERS")[1].split("TOP 10 ACCOUNTS")[0].splitlines()
    ranked = [x.split() for x in users if x.split()[:1] and x.split()[0].isdigit()]
    assert [r[1] for r in ranked] == ["alice", "bob", "me"]
    assert ranked[0][2] == "8.00" and ranked[1][2] == "4.00"  # bob still running: clipped at END
    accounts = out.split("TOP 10 ACCOUNTS")[1].split("MY USAGE")[0]
    assert "proj" in accounts and "12.00" in accounts
    assert "GPU-hours 0.00 (0.00 GPU-days), CPU-hours 2.00, 1 job(s), rank #3 of 3" in out
    assert "TOP USERS, LAST 7 DAYS" in out
    # 12 GPU-hours of 16 GPUs x 13 h
    assert "GPU-hours used 12.00 of 208.00: 5.8%" in out
    calls = (fake_slurm / "calls.txt").read_text()
    assert "sacct -a -X -n -P -S 2026-11-30T00:00:00 -E 2026-11-30T13:00:00" in calls


def test_usage_without_accounting_is_one_line(tmp_path, monkeypatch, capsys):
    bindir = tmp_path / "bin"
    fake_tool(bindir, "sinfo", f"cat <<'X'\n{SINFO}\nX")
    fake_tool(bindir, "sacct", "echo 'Slurm accounting storage is disabled' >&2; exit 1")
    use_bin(monkeypatch, bindir, only=True)
    assert main(["cluster", "usage"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "accounting is disabled" in err and "slurmdbd" in err


@pytest.mark.parametrize("report", [["status"], ["usage"]])
def test_without_slurm_is_one_line(tmp_path, monkeypatch, capsys, report):
    (tmp_path / "bin").mkdir()
    use_bin(monkeypatch, tmp_path / "bin", only=True)
    assert main(["cluster", *report]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "not found (SLURM is not installed on this machine)" in err


def test_usage_bad_dates(fake_slurm, capsys):
    assert main(["cluster", "usage", "yesterday"]) == 2
    assert "START 'yesterday'" in capsys.readouterr().err
    assert main(["cluster", "usage", "2026-11-30", "2026-11-01"]) == 2
    assert "is not after START" in capsys.readouterr().err
