"""A throw-away one-node SLURM cluster on localhost for tests (munged + slurmctld + slurmd, and with
``accounting=True`` MariaDB + slurmdbd so that ``sacct`` works).

Everything lives in a temp directory (config, state, spool, logs, pid files, the database) and is
reached through ``SLURM_CONF`` (slurmdbd finds ``slurmdbd.conf`` beside it), so /etc is never touched
and every port is a free one. Daemons are started here and stopped by their pid. A munged that already
answers is reused (and left running); otherwise one is started as the munge user.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun", "slurmctld", "slurmd", "munged", "munge",
         "unmunge", "setpriv")
ACCOUNTING_TOOLS = ("sacct", "sacctmgr", "slurmdbd", "mariadbd", "mariadb-install-db", "mariadb")


def missing_tools(accounting: bool = False) -> list[str]:
    return [t for t in TOOLS + (ACCOUNTING_TOOLS if accounting else ()) if shutil.which(t) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_ok() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if cred.returncode:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    accounting: bool = False

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)

    def active_jobs(self, ids: list[str]) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i", "-j", ",".join(ids)).stdout
        return [x.strip() for x in out.split() if x.strip()]

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        for tok in out.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"


def _accounting_lines(dbd_port: int | None) -> list[str]:
    if dbd_port is None:
        return ["AccountingStorageType=accounting_storage/none"]
    return ["AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={dbd_port}"]


def _conf(root: Path, cpus: int, dbd_port: int | None = None) -> str:
    return "\n".join(
        [
            "ClusterName=neoxttest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/slurmctld.log",
            f"SlurmdLogFile={root}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "KillWait=30",
            *_accounting_lines(dbd_port),
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _start_accounting(root: Path, env: dict[str, str], procs: list[subprocess.Popen], dbd_port: int) -> None:
    """MariaDB (own datadir, socket and port), then slurmdbd on ``dbd_port``, then the cluster registered."""
    db = root / "mysql"
    sock, db_port = root / "mysql.sock", _free_port()
    subprocess.run(["mariadb-install-db", "--user=root", f"--datadir={db}", "--auth-root-authentication-method=normal",
                    "--skip-test-db"], check=True, capture_output=True, timeout=120)
    procs.append(subprocess.Popen(
        ["mariadbd", "--no-defaults", "--user=root", f"--datadir={db}", f"--socket={sock}", f"--port={db_port}",
         "--bind-address=127.0.0.1", f"--pid-file={root / 'mysql.pid'}", "--skip-log-bin",
         "--innodb-buffer-pool-size=32M"],
        stdout=subprocess.DEVNULL, stderr=open(root / "mariadb.log", "w"),
    ))

    def sql(statement: str) -> bool:
        return subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", statement],
                              capture_output=True, timeout=10).returncode == 0

    _wait(lambda: sql("SELECT 1"), 60, f"mariadbd (see {root}/mariadb.log)")
    assert sql("CREATE DATABASE slurm_acct_db; CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'neoxt'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;")
    dbd_conf = root / "slurmdbd.conf"
    dbd_conf.write_text("\n".join([
        "AuthType=auth/munge", "DbdHost=localhost", f"DbdPort={dbd_port}", "SlurmUser=root",
        f"LogFile={root}/slurmdbd.log", f"PidFile={root}/slurmdbd.pid", "StorageType=accounting_storage/mysql",
        "StorageHost=127.0.0.1", f"StoragePort={db_port}", "StorageUser=slurm", "StoragePass=neoxt",
        "StorageLoc=slurm_acct_db", "",
    ]))
    dbd_conf.chmod(0o600)
    log = open(root / "slurmdbd.out", "w")
    procs.append(subprocess.Popen(["slurmdbd", "-D"], env=env, stdout=log, stderr=log))

    def dbd_up() -> bool:
        try:
            return subprocess.run(["sacctmgr", "-i", "add", "cluster", "neoxttest"], env=env, capture_output=True,
                                  timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    _wait(dbd_up, 60, f"slurmdbd (see {root}/slurmdbd.log)")


@contextmanager
def slurm_cluster(root: Path, accounting: bool = False) -> Iterator[Cluster]:
    """A running cluster for the ``with`` block; ``accounting``: also MariaDB + slurmdbd (sacct works)."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("state", "spool"):
        (root / d).mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    try:
        if not _munge_ok():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            procs.append(
                subprocess.Popen(
                    ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "-F"],
                    stdout=subprocess.DEVNULL, stderr=open(root / "munged.log", "w"),
                )
            )
            _wait(_munge_ok, 15, "munged")
        dbd_port = _free_port() if accounting else None
        conf.write_text(_conf(root, os.cpu_count() or 1, dbd_port))  # sacctmgr reads the dbd port from it
        if dbd_port is not None:
            _start_accounting(root, env, procs, dbd_port)
        log = open(root / "daemons.out", "w")
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=log, stderr=log))
        procs.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost", "-f", str(conf)], env=env, stdout=log, stderr=log))
        cluster = Cluster(root, env, accounting=dbd_port is not None)

        def idle() -> bool:
            try:
                return "idle" in cluster.run("sinfo", "-h", "-o", "%T", timeout=5).stdout
            except subprocess.TimeoutExpired:
                return False

        _wait(idle, 30, f"an idle slurm node (see {root}/slurmctld.log)")
        yield cluster
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
