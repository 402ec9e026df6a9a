"""What `neoxt publish` remembers between runs: the upload record and the per-repo lock.

The record (``<run>/hub_uploads.json``) lists, per repo, each revision uploaded and the commit that
holds it. It is written only after the Hub has answered a commit with its id, and on a rerun a
revision counts as done only when the remote branch still points at that commit, so a killed
publisher never leaves a revision marked done that the Hub does not have.

The lock is an ``flock`` on a file named after the repo: the kernel drops it when the holder dies
(even by SIGKILL), so a crashed publisher never blocks the next one, while two live ones on the same
repo cannot interleave commits.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from neoxt.errors import NeoxtError
from neoxt.io import write_text_atomic

RECORD_NAME = "hub_uploads.json"


class PublishLockedError(NeoxtError):
    """Another publisher holds the repo's lock."""


class UploadRecord:
    """``{repo_id: {revision: {"commit": oid, "step": N, "time": unix}}}`` in one JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, dict[str, Any]]] = {}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise NeoxtError(f"{path}: invalid JSON at line {err.lineno} ({err.msg}); "
                                 "delete it to re-check every revision against the Hub") from None

    def commit_of(self, repo_id: str, revision: str) -> str | None:
        return self.data.get(repo_id, {}).get(revision, {}).get("commit")

    def is_done(self, repo_id: str, revision: str, remote: Mapping[str, str]) -> bool:
        """Recorded here and the remote ref ``revision`` points at the recorded commit."""
        commit = self.commit_of(repo_id, revision)
        return commit is not None and remote.get(revision) == commit

    def mark(self, repo_id: str, revision: str, commit: str, step: int) -> None:
        self.data.setdefault(repo_id, {})[revision] = {"commit": commit, "step": step, "time": time.time()}
        write_text_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n", durable=True)


def lock_path(lock_dir: Path, repo_id: str) -> Path:
    return lock_dir / f".publish-{repo_id.replace('/', '__')}.lock"


@contextmanager
def publish_lock(path: Path, repo_id: str, wait: float = 0.0, poll: float = 0.5) -> Iterator[None]:
    """Hold the repo's lock for the block; wait up to ``wait`` seconds, then refuse naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
                    raise PublishLockedError(
                        f"another `neoxt publish` to {repo_id} is running ({holder}; lock {path}); "
                        "wait for it, or pass --wait-lock SECONDS") from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
