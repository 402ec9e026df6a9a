"""`neoxt doctor` prints its table and exits 0 on a CPU-only machine."""

import subprocess
import sys


def test_doctor_table_and_exit_code():
    proc = subprocess.run([sys.executable, "-m", "neoxt.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("torch", "GPUs", "bf16", "SDPA backends", "collective backends", "torch.distributed init",
                "forward/backward", "dependencies"):
        assert row in proc.stdout
    assert "2.13.0" in proc.stdout
    assert "FAIL" not in proc.stdout
    assert "neoxt is usable on this machine." in proc.stdout


def test_doctor_reports_a_failing_check(monkeypatch, capsys):
    from neoxt import doctor

    def broken():
        raise RuntimeError("simulated")

    monkeypatch.setattr(doctor, "CHECKS", (*doctor.CHECKS[:1], broken))
    assert doctor.run(None) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "simulated" in out and "NOT usable" in out


def test_train_check_passes_when_the_loss_falls(capsys):
    import argparse

    from neoxt import doctor

    assert doctor.run(argparse.Namespace(train_check=True)) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("training"))
    assert " ok " in row and "loss fell from" in row


def test_train_check_fails_when_the_loss_does_not_fall(monkeypatch, capsys):
    import argparse

    from neoxt import doctor
    from neoxt.train import demo

    # A learning rate too small to move the weights: the loss stays flat for 20 real steps.
    for key, value in (("lr", 1e-9), ("min_lr", 0.0), ("train_iters", 20)):
        monkeypatch.setitem(demo.TRAIN_CHECK, key, value)
    assert doctor.run(argparse.Namespace(train_check=True)) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("training"))
    assert "FAIL" in row and "20 steps" in row and "not by 10%" in row and "NOT usable" in out
