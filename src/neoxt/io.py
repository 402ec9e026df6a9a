"""Writing a file or a directory so that no reader ever sees half of it: a temporary name beside the
target, then one ``os.replace``. Results, records, configs, ``latest`` pointers and converted model
directories all go through here (checkpoint directories use the same pattern in
``neoxt.checkpoint.layout``, with DCP's collective write in the middle)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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


def unique_temp_path(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A temporary name beside ``path`` that no other process (or call) picks: ``<name>.<tag>.<pid>.<random>``.

    Two jobs writing the same output never share a temporary file, so the one that fails or loses a
    race can remove its own files without touching the other's."""
    import secrets

    target = Path(path)
    return target.with_name(f"{target.name}.{tag}.{os.getpid()}.{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, durable: bool = False,
                file_mode: int | None = None) -> Iterator[IO[Any]]:
    """Open a file to stream into ``path``: written under a temporary name unique to this process
    beside it, renamed over ``path`` when the block ends normally, removed when it raises.

    ``durable``: fsync the file and its directory (for files a crash must not lose, e.g. checkpoint
    pointers). ``file_mode``: permissions (e.g. 0o755 for a script)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp_path(target.with_name(f".{target.name}"))
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if file_mode is not None:
            os.chmod(tmp, file_mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int | None = None, durable: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (parent directories are created); see ``atomic_open``."""
    with atomic_open(path, "w", durable=durable, file_mode=mode) as f:
        f.write(text)
    return Path(path)


def check_writable(path: str | os.PathLike, what: str, *, directory: bool = False) -> Path:
    """Fail before the work, not after it: ``path`` (a directory, or a file to be written) can be
    created there. Creates missing parent directories and writes/removes a probe file.
    Raises ``OutputError`` naming ``what`` (the key or flag) and the path."""
    from neoxt.errors import OutputError

    p = Path(path)
    folder = p if directory else p.parent
    try:
        if p.exists() and p.is_dir() != directory:
            kind = "a directory" if p.is_dir() else "a file"
            raise OutputError(f"{what}: {p} is {kind}; expected {'a directory' if directory else 'a file path'}")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".neoxt-write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{what}: cannot write to {p} ({err.strerror or err})") from None
    return p


def temp_dir_beside(out: Path, error: type[Exception] = OSError, *, replace: bool = False) -> Path:
    """A fresh hidden directory next to ``out`` (same filesystem, so the final rename is atomic).

    ``out`` must be absent or an empty directory (or any directory when ``replace``); otherwise ``error``
    (a NeoxtError subclass from the caller) names it. Fill the directory, then ``publish_dir`` it; on
    failure remove it."""
    if out.exists() and (not out.is_dir() or (not replace and any(out.iterdir()))):
        raise error(f"{out}: output path already exists and is not empty; remove it or pick another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp_path(out.with_name(f".{out.name}"))
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Give ``tmp``'s files the usual permissions and rename it to ``out``.

    An existing non-empty ``out`` (allowed by ``temp_dir_beside(..., replace=True)``) is first renamed
    aside and removed after, so a reader sees the old directory or the new one, never a mixture."""
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.rglob("*"):  # safetensors writes 0600 files; give them the usual permissions
        if f.is_file():
            f.chmod(0o666 & ~umask)
    tmp.chmod(0o777 & ~umask)
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = unique_temp_path(out.with_name(f".{out.name}"), "old")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
