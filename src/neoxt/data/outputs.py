"""Where data commands write: checked before any work, owned by one run at a time, errors in one line.

- ``check_output_prefix`` / ``check_output_dir``: the directory exists (or can be created), is a
  directory, and accepts a new file; the final names are not directories. Run first, so a bad
  ``--output-prefix`` fails in a second instead of after hours of tokenizing.
- ``claim_output``: an exclusive lock ``<prefix>.lock`` (``fcntl.flock`` on the file, which the kernel
  drops when the process dies; the file names pid, host and start time for the message the loser
  prints). Two runs on one output: the second exits with a one-line error and touches nothing. A lock
  left by a dead process is taken over with a log line; a lock file naming another host is refused
  (a flock may not be visible across hosts), naming the host. Holding the lock, the owner removes
  temporary files that earlier, killed runs left under the prefix.
- ``output_error``: an ``OSError`` while writing (disk full, read-only file system, permission) as a
  ``DataError`` naming the file. Callers discard their temporary files first, so nothing is left
  half-written.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from neoxt.errors import DataError
from neoxt.io import unique_temp_path

log = logging.getLogger(__name__)

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent of it is a regular file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.EFBIG: "file too large for this file system",
}


# Errors of the disk itself (as opposed to a dropped connection, also an OSError).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})


def output_error(path: str | os.PathLike, err: OSError, doing: str = "cannot write") -> DataError:
    """``err`` as a one-line DataError naming ``path``; the caller has already removed its temporary files."""
    reason = _REASONS.get(err.errno or 0, err.strerror or str(err))
    return DataError(f"{os.fspath(path)}: {doing} ({reason}); nothing was written under the final names")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn any OSError inside the block into ``output_error(path)``."""
    try:
        yield
    except OSError as err:
        raise output_error(path, err) from err


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(directory: str | os.PathLike, what: str = "output directory", create: bool = True) -> Path:
    """Prove a file can be created in ``directory`` (created first when ``create``); DataError otherwise.

    With ``create=False`` nothing is made: a missing directory is judged by its nearest existing
    ancestor, so a command that fails later on bad input leaves no empty directory behind."""
    d = Path(directory).absolute()
    ancestor = _existing_ancestor(d)
    if not ancestor.is_dir():
        raise DataError(f"{d}: cannot use as {what}: {ancestor} is a regular file, not a directory")
    probe = unique_temp_path(ancestor / ".neoxt-write-test", "probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = _REASONS.get(err.errno or 0, err.strerror)
        raise DataError(f"{d}: {what} is not writable ({ancestor}: {reason})") from err
    if create:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise output_error(d, err, f"cannot create {what}") from err
    return d


def check_output_prefix(prefix: str | os.PathLike, suffixes: tuple[str, ...] = (".bin", ".idx"),
                        create: bool = True) -> None:
    """The prefix's directory is writable and no final name (``prefix + suffix``) is a directory."""
    p = os.fspath(prefix)
    if not os.path.basename(p):
        raise DataError(f"{p!r}: an output prefix needs a file name part, not only a directory")
    check_output_dir(os.path.dirname(os.path.abspath(p)), create=create)
    for suffix in suffixes:
        if os.path.isdir(p + suffix):
            raise DataError(f"{p + suffix}: is a directory; choose another output prefix")


# --- the lock --------------------------------------------------------------------------------------


def _describe(info: dict) -> str:
    if not info:
        return "a process that is starting up"
    started = info.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{since}"


def _read_info(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive claim on one output; ``release`` (or leaving the ``with`` block) gives it up."""

    def __init__(self, path: str, fd: int | None):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)  # while still holding it: nobody can take a lock on a file being removed
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _refuse(target: str, lock_path: str, info: dict) -> DataError:
    return DataError(f"{target}: another run is writing this output ({_describe(info)}, lock {lock_path}); "
                     "wait for it to finish or choose another output")


def _my_info() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": int(time.time())}).encode()


def _take_over(target: str, lock_path: str, previous: dict) -> None:
    """Decide about a lock file nobody holds: ours to take, unless it names another host."""
    if not previous:
        return
    if previous.get("host") not in (None, socket.gethostname()):
        raise DataError(f"{target}: locked by {_describe(previous)} ({lock_path}); that host's run may still be "
                        "writing. If it is gone, delete the lock file")
    log.warning("taking over %s: its run (%s) is no longer running", lock_path, _describe(previous))


def _lock_exclusive_create(target: str, lock_path: str) -> OutputLock:
    """For file systems without flock: O_EXCL creation, stale files of dead local pids removed first."""
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            with open(lock_path, "rb") as f:
                previous = _read_info(f.fileno())
            if previous.get("host") == socket.gethostname() and not _pid_alive(previous.get("pid")):
                _take_over(target, lock_path, previous)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
                continue
            raise _refuse(target, lock_path, previous) from None
        os.write(fd, _my_info())
        return OutputLock(lock_path, fd)
    raise _refuse(target, lock_path, {})


def _lock(target: str, lock_path: str) -> OutputLock:
    import fcntl

    for _ in range(10):
        try:
            fd, created = os.open(lock_path, os.O_RDWR), False
        except FileNotFoundError:
            try:
                fd, created = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
            except FileExistsError:
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise _refuse(target, lock_path, info) from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                if created:
                    os.unlink(lock_path)
                return _lock_exclusive_create(target, lock_path)
            raise
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner removed it between our open and our flock: start over
            os.close(fd)
            continue
        try:
            _take_over(target, lock_path, _read_info(fd))
            os.ftruncate(fd, 0)
            os.pwrite(fd, _my_info(), 0)
        except BaseException:
            os.close(fd)
            raise
        return OutputLock(lock_path, fd)
    raise _refuse(target, lock_path, {})


def claim_output(prefix: str | os.PathLike, temp_globs: tuple[str, ...] = (".bin.tmp*", ".idx.tmp*")) -> OutputLock:
    """Lock ``<prefix>.lock`` for this run, then remove temporaries killed runs left (``prefix + glob``).

    DataError (one line, nothing touched) when another live run holds it or the directory is not
    writable."""
    p = os.fspath(prefix)
    lock_path = p + ".lock"
    try:
        lock = _lock(p, lock_path)
    except OSError as err:
        raise output_error(lock_path, err, "cannot create lock file") from err
    for pattern in temp_globs:
        for stale in glob.glob(glob.escape(p) + pattern):
            with contextlib.suppress(OSError):
                os.remove(stale)
                log.info("removed %s, left by an interrupted run", stale)
    return lock
