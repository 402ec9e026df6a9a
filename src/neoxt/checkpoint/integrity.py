"""Checksums of a checkpoint's files, written with the checkpoint and verified when it is read.

A flipped byte on disk or in transit otherwise loads silently (a shard with 4,000 changed bytes trained
on with a worse loss). ``checksums.sha256`` sits in each ``global_step<N>/`` in ``sha256sum`` format
(``sha256sum -c checksums.sha256`` checks it by hand) and lists every other file of the directory.

- ``write_manifest`` (save): each rank hashes a share of the files, rank 0 writes the manifest before
  the directory is published, so it is part of the atomic rename.
- ``verify_files`` (small files a command reads without loading: ``meta.json``, ``config.yml``,
  ``.metadata``): just those files.
- ``verify_checkpoint`` (``load_state``, ``neoxt convert inspect --verify``): every file, shared
  between ranks; every rank learns any mismatch, so all raise together instead of hanging in DCP.

Hashing runs in threads (hashlib releases the GIL), reading each file once more than the load does.
A directory without a manifest (written before neoxt recorded checksums) is read unverified.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from neoxt.errors import CheckpointError

MANIFEST_FILE = "checksums.sha256"
REHASH_COMMAND = f"sha256sum .metadata * > {MANIFEST_FILE}"  # what a user runs after editing a file on purpose
_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_many(paths: list[Path]) -> dict[str, str]:
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return dict(zip((p.name for p in paths), pool.map(file_sha256, paths), strict=True))


def _dist() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _gather(value: object, group: Any = None) -> list[object]:
    distributed, _, world = _dist()
    if not distributed:
        return [value]
    import torch.distributed as dist

    out: list[object] = [None] * world
    dist.all_gather_object(out, value, group=group)
    return out


def _data_files(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.iterdir() if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(ckpt_dir: Path, extra: list[Path] = (), group: Any = None) -> None:
    """Hash the files of ``ckpt_dir`` (collective over ``group`` under a process group; rank 0 writes
    the manifest).

    ``extra``: files rank 0 writes after the collective part (config, meta), hashed by rank 0."""
    _, rank, world = _dist()
    files = [p for p in _data_files(ckpt_dir) if p not in extra]
    shares = _gather(_hash_many(files[rank::world]), group)
    if rank != 0:
        return
    digests: dict[str, str] = {}
    for share in shares:
        digests.update(share)  # type: ignore[arg-type]
    digests.update(_hash_many([p for p in extra if p.is_file()]))
    text = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    (ckpt_dir / MANIFEST_FILE).write_text(text, encoding="utf-8")


def read_manifest(ckpt_dir: Path) -> dict[str, str] | None:
    """name → sha256 hex, or None when the checkpoint has no manifest."""
    path = ckpt_dir / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    out = {}
    lines = text.split("\n")  # only "\n": str.splitlines would also split at a damaged byte such as \x0b
    if lines[-1] != "":
        raise CheckpointError(f"{path}: truncated (no final newline; the manifest is damaged)")
    for n, line in enumerate(lines[:-1], 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or "/" in name or not name.isprintable() \
                or any(c not in "0123456789abcdef" for c in digest):
            raise CheckpointError(f"{path}:{n}: not a '<sha256>  <file>' line (the manifest is damaged)")
        if name != MANIFEST_FILE:  # a hand-made manifest (REHASH_COMMAND) lists itself
            out[name] = digest
    return out


def _mismatch(ckpt_dir: Path, manifest: dict[str, str], names: list[str]) -> str | None:
    """The first problem with ``names`` (missing file or changed bytes), or None."""
    paths = []
    for name in names:
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path}: missing (listed in {MANIFEST_FILE})"
        paths.append(path)
    actual = _hash_many(paths)
    for name in names:
        if actual[name] != manifest[name]:
            return (f"{ckpt_dir / name}: checksum mismatch (changed after it was saved: disk or copy corruption); "
                    f"expected sha256 {manifest[name][:16]}…, found {actual[name][:16]}… (edited on purpose? "
                    f"in that directory run: {REHASH_COMMAND})")
    return None


def verify_files(ckpt_dir: str | os.PathLike, *names: str) -> None:
    """Check the listed files of ``ckpt_dir`` against its manifest (files it does not list are skipped)."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if manifest is None:
        return
    problem = _mismatch(ckpt_dir, manifest, [n for n in names if n in manifest])
    if problem:
        raise CheckpointError(problem)


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> int | None:
    """Check every file of ``ckpt_dir`` against its manifest; returns the number of files checked, or
    None without a manifest. Collective under a process group (each rank checks a share)."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if manifest is None:
        return None
    _, rank, world = _dist()
    names = sorted(manifest)
    problems = [p for p in _gather(_mismatch(ckpt_dir, manifest, names[rank::world])) if p]
    if problems:
        raise CheckpointError(str(problems[0]))
    return len(names)
