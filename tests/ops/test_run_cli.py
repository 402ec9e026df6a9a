"""`neoxt run --slurm -- COMMAND`: the script, and a fake sbatch that runs it here the way a batch node
would (the real cluster run is in tests/distributed/test_slurm_real.py)."""

from __future__ import annotations

import re
import subprocess
import sys

from statuskit import fake_tool, use_bin

from neoxt.cli import main

# Runs the script synchronously as job 500+n, output to its #SBATCH --output, in its --chdir, with the
# caller's environment (as sbatch exports it by default).
FAKE_SBATCH = r"""
script="${@: -1}"
n=$(grep -c '^sbatch' "$(dirname "$0")/calls.txt")
id=$((500 + n))
out=$(sed -n 's/^#SBATCH --output=//p' "$script"); out=${out//%j/$id}
cd "$(sed -n 's/^#SBATCH --chdir=//p' "$script")"
PATH=$CALLER_PATH SLURM_JOB_ID=$id SLURM_JOB_NODELIST=localhost bash "$script" > "$out" 2>&1
echo "$id"
"""


def test_run_submits_command_with_modules_and_setup(tmp_path, monkeypatch, capsys):
    bindir = tmp_path / "bin"
    fake_tool(bindir, "sbatch", FAKE_SBATCH)
    fake_tool(bindir, "module", 'echo "loaded by module: $*"')
    use_bin(monkeypatch, bindir)
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--slurm", "--job-name", "hello", "--module", "cuda/12.6", "--module", "aws-ofi-nccl",
               "--setup", "export GREETING='hi there'", "--env", "ANSWER_PREFIX=answer:",
               "--", sys.executable, "-c", "import os; print(os.environ['GREETING'], os.environ['ANSWER_PREFIX'], 6 * 7)"])
    out = capsys.readouterr().out
    assert rc == 0, out
    (job_id,) = re.findall(r"submitted job (\d+)", out)
    log = tmp_path / "logs" / f"hello-{job_id}.out"
    assert f"log: {log}" in out
    text = log.read_text()
    assert "hi there answer: 42" in text
    assert text.index("loaded by module: load cuda/12.6") < text.index("loaded by module: load aws-ofi-nccl")
    assert f"neoxt: job {job_id} finished with exit code 0" in text
    script = next((tmp_path / "logs").glob("hello-*.sbatch")).read_text()
    assert "#SBATCH --job-name=hello" in script and "#SBATCH --time=02:00:00" in script
    assert "--gpus-per-node" not in script


def test_run_exit_code_and_dry_run(tmp_path, monkeypatch, capsys):
    bindir = tmp_path / "bin"
    fake_tool(bindir, "sbatch", FAKE_SBATCH)
    use_bin(monkeypatch, bindir)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--slurm", "--log-dir", str(tmp_path / "l"), "--", "bash", "-c", "echo oops; exit 3"]) == 0
    out = capsys.readouterr().out
    (job_id,) = re.findall(r"submitted job (\d+)", out)
    assert "finished with exit code 3" in (tmp_path / "l" / f"neoxt-run-{job_id}.out").read_text()

    assert main(["run", "--slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                 "--", "nvidia-smi", "-L"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "srun --ntasks-per-node=1 nvidia-smi -L"):
        assert line in script.splitlines(), line
    path = tmp_path / "s.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_run_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args, needle in (
        (["--", "true"], "only --slurm"),
        (["--slurm"], "no command given"),
        (["--slurm", "--time", "2h", "--", "true"], "--time '2h'"),
        (["--slurm", "--module", "cuda 12", "--", "true"], "--module 'cuda 12'"),
    ):
        assert main(["run", "--dry-run", *args]) == 2, args
        err = capsys.readouterr().err
        assert needle in err and err.strip().count("\n") == 0, err
    (tmp_path / "bin").mkdir()
    use_bin(monkeypatch, tmp_path / "bin", only=True)
    assert main(["run", "--slurm", "--", "true"]) == 2
    assert "sbatch: command not found" in capsys.readouterr().err
