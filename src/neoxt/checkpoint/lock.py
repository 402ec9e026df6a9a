"""One training run per ``save`` directory.

A resubmitted SLURM job racing the one it replaces, or a user starting the same command twice, would
otherwise interleave checkpoints in one directory. ``run_lock`` creates ``<save>/neoxt.lock`` with
``O_EXCL`` (atomic on local and network file systems) holding the owner's pid, host and start time:

- the lock exists and its owner is alive, or lives on another host (whose pids we cannot check) →
  ``CheckpointError`` naming the owner and the lock file; the second run has changed nothing;
- the owner was on this host and its pid is gone (``kill -9``, node reboot) → the stale lock is taken
  over with a log line. The take-over itself is serialised with ``flock`` on ``neoxt.lock.guard``
  (same host only, where ``flock`` is reliable), so two runs finding the same stale lock cannot both win.

The lock is removed when the run ends (if it is still ours).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from neoxt.errors import CheckpointError

LOCK_FILE = "neoxt.lock"
_GUARD_FILE = "neoxt.lock.guard"


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(lock: Path) -> dict[str, Any] | None:
    """The lock's owner, or None when the file vanished; an unreadable file is an owner we cannot judge."""
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}


def _create(lock: Path, owner: dict[str, Any]) -> bool:
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(owner) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _busy(lock: Path, held: dict[str, Any]) -> CheckpointError:
    if not held:
        return CheckpointError(f"{lock}: exists but is unreadable; another run may be using {lock.parent} "
                               "(delete the file if no run is)")
    where = "this host" if held.get("host") == socket.gethostname() else f"host {held.get('host')}"
    return CheckpointError(
        f"{lock.parent}: in use by another neoxt run (pid {held.get('pid')} on {where}, started "
        f"{held.get('started', '?')}); wait for it to end, or delete {lock} if that job is dead")


def _stale(held: dict[str, Any]) -> bool:
    return bool(held) and held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) \
        and not pid_alive(held["pid"])


def acquire(save_dir: str | os.PathLike, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Take ``<save_dir>/neoxt.lock`` for this process (see the module docstring); returns the owner record."""
    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"save: cannot create {save_dir}: {err.strerror or err}") from None
    lock, owner = save_dir / LOCK_FILE, _owner()
    for _ in range(3):
        if _create(lock, owner):
            return owner
        held = _read(lock)
        if held is None:
            continue  # released between our two looks
        if not _stale(held):
            raise _busy(lock, held)
        with open(save_dir / _GUARD_FILE, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if _read(lock) == held:  # nobody took it over while we waited for the guard
                lock.unlink()
                say(f"note: took over the stale lock {lock} of pid {held['pid']} (started "
                    f"{held.get('started', '?')}), which is no longer running")
            won = _create(lock, owner)
        if won:
            return owner
    raise _busy(lock, _read(lock) or {})


def release(save_dir: str | os.PathLike, owner: dict[str, Any]) -> None:
    """Remove the lock if it is still ``owner``'s."""
    lock = Path(save_dir) / LOCK_FILE
    if _read(lock) == owner:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(save_dir: str | os.PathLike | None, say: Callable[[str], None] = print,
             enabled: bool = True) -> Iterator[None]:
    """Hold the run lock of ``save_dir`` for the ``with`` block (no-op without a save dir or when disabled)."""
    if not save_dir or not enabled:
        yield
        return
    owner = acquire(save_dir, say)
    try:
        yield
    finally:
        release(save_dir, owner)
