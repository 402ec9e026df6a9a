"""Writing a file so that no reader ever sees half of it: a temporary name beside the target, then
one ``os.replace``. Results, records, configs and ``latest`` pointers all go through here."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename or a new file) on POSIX filesystems."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int | None = None, durable: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (parent directories are created).

    ``mode``: file permissions (e.g. 0o755 for a script). ``durable``: fsync the file and its directory
    before returning, for files a crash must not lose (checkpoint pointers)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)
    return target


def unique_temp_path(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A temporary name beside ``path`` that no other process (or call) picks: ``<name>.<tag>.<pid>.<random>``.

    Two jobs writing the same output never share a temporary file, so the one that fails or loses a
    race can remove its own files without touching the other's."""
    import secrets

    target = Path(path)
    return target.with_name(f"{target.name}.{tag}.{os.getpid()}.{secrets.token_hex(4)}")
