"""Fetching and unpacking corpus files: resumable HTTP downloads, checksums, archive extraction.

Corpora are tens of gigabytes on servers that drop connections, so a download is written to
``<file>.part`` and an interrupted one continues from where it stopped with an HTTP ``Range``
request (retried a few times in-process, and again by simply re-running the command). The final
name appears only once the file is complete and, where a checksum is known, verified; a file that
fails its checksum is deleted and refused. The ``.part`` file is locked (``flock``) while written,
so two processes never append to the same one.

Extraction (``.zip``, ``.tar[.gz|.bz2|.xz|.zst]``, single ``.gz``/``.zst``/``.xz`` files) goes to
a temporary directory beside the target and is moved into place at the end, refusing members that
would land outside the target (absolute paths, ``..``, links out).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import http.client
import logging
import lzma
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from neoxt.data.outputs import DISK_ERRNOS, output_error
from neoxt.errors import DataError
from neoxt.progress import Progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
SINGLE_SUFFIXES = (".gz", ".zst", ".xz")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _open_url(url: str, start: int, timeout: float) -> Any:
    headers = {"User-Agent": "neoxt"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing after `start`: the .part is already complete
            return None
        raise DataError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(f"{url}: cannot connect ({reason})") from None


def _expected_total(resp: Any, start: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200); None when unknown."""
    rng = resp.headers.get("Content-Range", "")
    if resp.status == 206 and "/" in rng and not rng.endswith("/*"):
        return int(rng.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    if length is None:
        return None
    return int(length) + (start if resp.status == 206 else 0)


def _fetch_once(url: str, part: IO[bytes], timeout: float, desc: str) -> int | None:
    """Append the rest of ``url`` to ``part`` (from its current size); returns the expected total."""
    start = part.seek(0, os.SEEK_END)
    resp = _open_url(url, start, timeout)
    if resp is None:
        return start
    with resp:
        if start and resp.status != 206:  # the server ignored the range: start over
            part.seek(0)
            part.truncate()
            start = 0
        total = _expected_total(resp, start)
        with Progress(total, desc, unit="B", initial=start) as bar:
            for block in iter(lambda: resp.read(CHUNK), b""):
                part.write(block)
                bar.update(len(block))
    part.flush()
    if total is not None and part.tell() < total:  # http.client returns b"" when the peer hangs up early
        raise ConnectionError(f"connection closed after {part.tell()} of {total} bytes")
    return total


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff_s: float = 1.0,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); returns ``dest``.

    An existing ``dest`` is kept (checked against ``sha256`` when given). A connection lost midway
    is retried ``retries`` times from where it stopped; after that the ``.part`` file stays for
    the next run to resume, and a DataError says so.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256:
            _check_sha256(url, dest, sha256, remove=False)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_path = dest.with_name(dest.name + ".part")
    with open(part_path, "ab") as part:
        try:
            fcntl.flock(part.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"{part_path}: another process is downloading this file") from None
        try:
            total = _fetch_with_retries(url, part, retries, timeout, backoff_s, dest.name)
        except BaseException as err:
            if part.seek(0, os.SEEK_END) == 0:  # nothing to resume: leave nothing behind
                part_path.unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in DISK_ERRNOS:  # a full disk: one line, .part kept
                raise output_error(part_path, err) from err
            raise
        size = part.seek(0, os.SEEK_END)
    if total is not None and size != total:
        raise DataError(f"{url}: server sent {size} of {total} bytes; run again to resume ({part_path} kept)")
    if sha256:
        _check_sha256(url, part_path, sha256, remove=True)
    os.replace(part_path, dest)
    return dest


def _fetch_with_retries(url: str, part: IO[bytes], retries: int, timeout: float, backoff_s: float,
                        desc: str) -> int | None:
    for attempt in range(retries + 1):
        try:
            return _fetch_once(url, part, timeout, desc)
        except (http.client.HTTPException, ConnectionError, TimeoutError) as err:
            part.flush()
            have = part.seek(0, os.SEEK_END)
            if attempt == retries:
                raise DataError(f"{url}: download interrupted after {have} bytes ({type(err).__name__}); "
                                f"run again to resume from {part.name}") from None
            log.warning("%s: connection lost after %d bytes (%s); resuming", url, have, type(err).__name__)
            time.sleep(backoff_s * 2**attempt)
    return None


def _check_sha256(url: str, path: Path, expected: str, remove: bool) -> None:
    got = sha256_file(path)
    if got.lower() != expected.lower():
        if remove:
            path.unlink(missing_ok=True)
        what = "the download was deleted" if remove else f"delete {path} or pass --force-redownload"
        raise DataError(f"{url}: checksum mismatch (sha256 {got}, expected {expected}); {what}")


# --- extraction ------------------------------------------------------------------------------------


def is_archive(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(ARCHIVE_SUFFIXES)


def _safe_target(root: Path, name: str, archive: Path) -> Path:
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"{archive}: member {name!r} would be written outside {root}; refusing the archive")
    return target


def _extract_zip(archive: Path, tmp: Path, on_bytes: Callable[[int], None]) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = _safe_target(tmp, info.filename, archive)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                _copy(src, out, on_bytes)


def _tar_stream(archive: Path) -> tarfile.TarFile:
    name = archive.name.lower()
    if name.endswith(".tar.zst"):
        import zstandard

        raw = open(archive, "rb")  # noqa: SIM115 -- closed with the stream reader
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True, read_across_frames=True)
        return tarfile.open(fileobj=reader, mode="r|")
    return tarfile.open(archive, mode="r|*")


def _extract_tar(archive: Path, tmp: Path, on_bytes: Callable[[int], None]) -> None:
    with _tar_stream(archive) as tf:
        for member in tf:
            _safe_target(tmp, member.name, archive)
            try:
                tf.extract(member, tmp, filter="data")
            except tarfile.FilterError as err:
                raise DataError(f"{archive}: unsafe member {member.name!r} ({err}); refusing the archive") from None
            on_bytes(member.size)


def _open_single(archive: Path) -> IO[bytes]:
    name = archive.name.lower()
    if name.endswith(".gz"):
        return gzip.open(archive, "rb")  # type: ignore[return-value]
    if name.endswith(".xz"):
        return lzma.open(archive, "rb")  # type: ignore[return-value]
    import zstandard

    raw = open(archive, "rb")  # noqa: SIM115 -- closed with the stream reader
    return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True, read_across_frames=True)  # type: ignore[return-value]


def _copy(src: IO[bytes], out: IO[bytes], on_bytes: Callable[[int], None]) -> None:
    for block in iter(lambda: src.read(CHUNK), b""):
        out.write(block)
        on_bytes(len(block))


def extract(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Unpack ``archive`` into ``dest_dir``; returns the regular files it produced (sorted).

    Archives (zip, tar, compressed tar) keep their member paths; a single compressed file becomes
    the file without its last suffix. Everything is unpacked into a temporary directory first and
    moved into ``dest_dir`` only when complete, so an interrupted extraction leaves nothing.
    """
    archive, dest = Path(archive), Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".extract-{archive.name}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lower = archive.name.lower()
    try:
        with Progress(archive.stat().st_size if lower.endswith(".zip") else None,
                      f"extracting {archive.name}", unit="B") as bar:
            if lower.endswith(".zip"):
                _extract_zip(archive, tmp, bar.update)
            elif lower.endswith(ARCHIVE_SUFFIXES):
                _extract_tar(archive, tmp, bar.update)
            elif lower.endswith(SINGLE_SUFFIXES):
                with _open_single(archive) as src, open(tmp / archive.name[: archive.name.rfind(".")], "wb") as out:
                    _copy(src, out, bar.update)
            else:
                raise DataError(f"{archive}: not an archive neoxt can unpack (zip, tar, tar.gz, .gz, .zst, .xz)")
        files = sorted(_move_into(tmp, dest))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, lzma.LZMAError) as err:
        raise DataError(f"{archive}: cannot unpack ({type(err).__name__}: {err})") from None
    except Exception as err:
        if type(err).__module__.startswith("zstandard"):
            raise DataError(f"{archive}: cannot decompress ({err})") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def _move_into(tmp: Path, dest: Path) -> Iterator[Path]:
    """Move the unpacked tree into ``dest`` (replacing what was there); yields the final file paths."""
    for entry in sorted(tmp.iterdir()):
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
        if target.is_dir():
            yield from (p for p in target.rglob("*") if p.is_file())
        elif target.is_file():
            yield target
