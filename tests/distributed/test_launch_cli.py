"""`neoxt launch`: the sbatch script (--dry-run), chained submission (fake sbatch), option errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from neoxt.cli import main
from neoxt.distributed import launch as L


def _cfg(tmp_path: Path, **extra) -> Path:
    lines = [f"save: {tmp_path / 'runs' / 'exp1'}", "train_iters: 10", *[f"{k}: {v}" for k, v in extra.items()]]
    p = tmp_path / "cfg.yml"
    p.write_text("\n".join(lines) + "\n")
    return p


def _launch(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["launch", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dry_run_script_has_resources_rendezvous_env_signal(tmp_path, capsys):
    cfg = _cfg(tmp_path, model_parallel_size=2)
    env_file = tmp_path / "slingshot.env"
    env_file.write_text("# Slingshot\nexport FI_PROVIDER=cxi\nNCCL_SOCKET_IFNAME='hsn'\n\n")
    rc, out, _ = _launch(
        [str(cfg), "--slurm", "--dry-run", "--nodes", "16", "--gpus-per-node", "4", "--time", "1-00:00:00",
         "--partition", "gpu", "--account", "proj42", "--env", "NCCL_NET=AWS Libfabric",
         "--env", "LD_LIBRARY_PATH=/opt/ofi/lib:$LD_LIBRARY_PATH", "--env-file", str(env_file),
         "--signal", "USR1@300", "--chain", "30"],
        capsys,
    )
    assert rc == 0
    run = tmp_path / "runs" / "exp1"
    for line in (
        "#!/bin/bash",
        "#SBATCH --job-name=exp1",
        "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        f"#SBATCH --output={run / 'logs' / 'exp1-%j.out'}",
        "#SBATCH --signal=B:USR1@300",
        'export NCCL_NET="AWS Libfabric"',
        'export LD_LIBRARY_PATH="/opt/ofi/lib:$LD_LIBRARY_PATH"',
        'export FI_PROVIDER="cxi"',
        'export NCCL_SOCKET_IFNAME="hsn"',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR=$head_node MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}",
        "trap 'forward_signal USR1' USR1",
        "srun_pid=$!",
    ):
        assert line in out.splitlines(), line
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}" in out
    for arg in ('"--nnodes=$SLURM_JOB_NUM_NODES"', "--nproc-per-node=4", "--rdzv-backend=c10d",
                '"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"', '"--rdzv-id=$SLURM_JOB_ID"',
                "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",
                "--shutdown-timeout=290", f"-m neoxt.cli train {cfg}"):
        assert arg in out, arg
    assert "-m neoxt.distributed.agent" in out
    assert "--chain 30" in out and "afterany" in out
    assert not run.exists()  # a dry run writes nothing


def test_script_is_valid_bash(tmp_path):
    job = L.SlurmJob(configs=("/x/a b.yml",), run_name="r", nodes=2, gpus_per_node=0, nproc_per_node=2,
                     time="00:10:00", log_dir="/tmp/l", workdir="/tmp", python="/usr/bin/python3",
                     env=(("A", 'quote " and `tick` and \\ back'),))
    script = L.render_sbatch(job)
    assert "--gpus-per-node" not in script
    assert "'/x/a b.yml'" in script
    path = tmp_path / "s.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # The env value survives bash quoting verbatim.
    export = next(line for line in script.splitlines() if line.startswith("export A="))
    got = subprocess.run(["bash", "-c", f"{export}; printf %s \"$A\""], capture_output=True, text=True).stdout
    assert got == 'quote " and `tick` and \\ back'


def _fake_sbatch(tmp_path: Path) -> tuple[Path, Path]:
    calls = tmp_path / "sbatch_calls.txt"
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text(
        "#!/bin/bash\n"
        f'echo "$@" >> {calls}\n'
        f"n=$(wc -l < {calls})\n"
        'echo "$((1000 + n));cluster"\n'
    )
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    return sbatch.parent, calls


def test_chain_submits_afterany_dependencies_and_records_jobs(tmp_path, capsys, monkeypatch):
    bindir, calls = _fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cfg = _cfg(tmp_path)
    rc, out, _ = _launch([str(cfg), "--slurm", "--nodes", "2", "--gpus-per-node", "4", "--time", "04:00:00",
                          "--chain", "3"], capsys)
    assert rc == 0
    run = tmp_path / "runs" / "exp1"
    submitted = calls.read_text().splitlines()
    assert len(submitted) == 3
    script = submitted[0].split()[-1]
    assert submitted[0] == f"--parsable {script}"
    assert submitted[1] == f"--parsable --dependency=afterany:1001 {script}"
    assert submitted[2] == f"--parsable --dependency=afterany:1002 {script}"
    assert Path(script).is_file() and os.access(script, os.X_OK) and Path(script).parent == run / "slurm"
    for job_id in ("1001", "1002", "1003"):
        assert f"submitted job {job_id}" in out and str(run / "logs" / f"exp1-{job_id}.out") in out
    jobs = json.loads((run / "slurm_jobs.json").read_text())["jobs"]
    assert [j["job_id"] for j in jobs] == ["1001", "1002", "1003"]
    assert [j["dependency"] for j in jobs] == [None, "afterany:1001", "afterany:1002"]
    assert jobs[2]["log"] == str(run / "logs" / "exp1-1003.out")
    # A second launch appends to the record.
    _launch([str(cfg), "--slurm", "--gpus-per-node", "4"], capsys)
    assert len(json.loads((run / "slurm_jobs.json").read_text())["jobs"]) == 4


def test_sbatch_refusal_is_one_line_error(tmp_path, capsys, monkeypatch):
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text("#!/bin/bash\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sbatch.parent}{os.pathsep}{os.environ['PATH']}")
    rc, _, err = _launch([str(_cfg(tmp_path)), "--slurm", "--partition", "nope"], capsys)
    assert rc == 2
    assert err.strip().count("\n") == 0 and "invalid partition specified: nope" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--time", "90"], "--time '90'"),
        (["--time", "01:61:00"], "below 60"),
        (["--signal", "KILL@10"], "--signal 'KILL@10'"),
        (["--signal", "USR2@60"], "checkpoints on USR1 or TERM"),
        (["--signal", "USR1"], "SIG@SECONDS"),
        (["--time", "00:01:00", "--signal", "USR1@120"], "not shorter"),
        (["--env", "1BAD=x"], "KEY=VALUE"),
        (["--env", "NOVALUE"], "KEY=VALUE"),
        (["--chain", "0"], "--chain 0"),
        (["--nodes", "3", "--gpus-per-node", "1"], "world size 3 is not divisible"),
        (["--env-file", "/nonexistent/file.env"], "/nonexistent/file.env"),
    ],
)
def test_bad_options_fail_with_one_line(tmp_path, capsys, args, needle):
    rc, _, err = _launch([str(_cfg(tmp_path, model_parallel_size=2)), "--slurm", "--dry-run", *args], capsys)
    assert rc == 2
    assert needle in err and err.strip().count("\n") == 0, err


def test_env_file_error_names_file_and_line(tmp_path):
    f = tmp_path / "x.env"
    f.write_text("A=1\nthis is not an assignment\n")
    with pytest.raises(L.LaunchError, match=rf"{f}:2"):
        L.read_env_file(str(f))


def test_slurm_needs_save(tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text("train_iters: 5\n")
    rc, _, err = _launch([str(cfg), "--slurm", "--dry-run"], capsys)
    assert rc == 2 and "'save' must be set" in err


def test_single_node_dry_run_and_world_check(tmp_path, capsys):
    cfg = _cfg(tmp_path, pipe_parallel_size=2)
    rc, out, _ = _launch([str(cfg), "--nproc-per-node", "4", "--dry-run"], capsys)
    assert rc == 0
    assert out.split()[:3] == [sys.executable, "-m", "neoxt.distributed.agent"]
    assert "--standalone" in out and "--nproc-per-node=4" in out and out.strip().endswith(f"train {cfg}")
    rc, _, err = _launch([str(cfg), "--nproc-per-node", "3", "--dry-run"], capsys)
    assert rc == 2 and "pipe_parallel_size" in err and "3" in err
    rc, out, _ = _launch([str(cfg), "--nproc-per-node", "2", "--dry-run", "--set", "train_iters=7"], capsys)
    assert rc == 0 and out.strip().endswith(f"train {cfg} --set=train_iters=7")


def test_modules_and_setup_lines_run_before_training(tmp_path, capsys):
    """Issue 13: `--module NAME` (repeatable) and `--setup 'LINE'` go into the script, in order, after the
    env block and before srun; a module that fails to load stops the job."""
    rc, out, _ = _launch(
        [str(_cfg(tmp_path)), "--slurm", "--dry-run", "--gpus-per-node", "4", "--env", "FI_PROVIDER=cxi",
         "--module", "cuda/12.6", "--module", "aws-ofi-nccl/1.9", "--setup", "source /opt/venv/bin/activate",
         "--setup", "ulimit -n 65536"],
        capsys,
    )
    assert rc == 0
    lines = out.splitlines()
    order = [
        'export FI_PROVIDER="cxi"',
        "module load cuda/12.6 || { echo 'neoxt: module load cuda/12.6 failed' >&2; exit 1; }",
        "module load aws-ofi-nccl/1.9 || { echo 'neoxt: module load aws-ofi-nccl/1.9 failed' >&2; exit 1; }",
        "source /opt/venv/bin/activate",
        "ulimit -n 65536",
    ]
    idx = [lines.index(x) for x in order]
    assert idx == sorted(idx)
    assert idx[-1] < next(i for i, x in enumerate(lines) if x.startswith("srun "))
    # The module block runs: a failing `module` ends the script with exit 1 before anything else.
    block = "\n".join(lines[idx[0] : idx[-1] + 1])
    ok = subprocess.run(["bash", "-c", 'module() { echo "module $*"; }\nulimit() { :; }\nsource() { echo "src $1"; }\n'
                         + block + "\necho reached"], capture_output=True, text=True)
    assert ok.stdout.splitlines() == ["module load cuda/12.6", "module load aws-ofi-nccl/1.9",
                                      "src /opt/venv/bin/activate", "reached"]
    bad = subprocess.run(["bash", "-c", "module() { return 1; }\n" + block + "\necho reached"], capture_output=True, text=True)
    assert bad.returncode == 1 and "reached" not in bad.stdout and "module load cuda/12.6 failed" in bad.stderr
    # Without the options the script has no module section.
    rc, out, _ = _launch([str(_cfg(tmp_path)), "--slurm", "--dry-run"], capsys)
    assert "module load" not in out


def test_bad_module_name_is_one_line(tmp_path, capsys):
    rc, _, err = _launch([str(_cfg(tmp_path)), "--slurm", "--dry-run", "--module", "cuda/12.6 nccl"], capsys)
    assert rc == 2 and "--module 'cuda/12.6 nccl'" in err and err.strip().count("\n") == 0
