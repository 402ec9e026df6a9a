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
