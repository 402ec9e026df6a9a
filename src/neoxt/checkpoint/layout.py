"""neoxt checkpoints: one directory per saved iteration, written atomically.

Layout (see DESIGN.md)::

    <save>/latest                     text "global_step<N>", replaced atomically
    <save>/global_step<N>/            a torch.distributed.checkpoint (DCP) directory, plus
                         config.yml   the resolved run config (text given by the caller)
                         meta.json    iteration, consumed tokens/samples, neoxt version, time
                         checksums.sha256  every other file's sha256 (``integrity.py``), verified on read

A checkpoint is written to ``global_step<N>.tmp-<host>-<pid>/`` (rank 0's; unique per process, so two
writers never share one) and renamed only once every file is complete and fsynced, so a crash (or
``kill -9``) at any moment leaves either the previous checkpoint or the new one, never half of one.
``latest`` is written to a temporary name and ``os.replace``d for the same reason. Readers ignore
``*.tmp*`` directories; a writer removes those of dead processes on its host.

DCP is used because it stores each tensor under its fully-qualified name and reshards on load:
a checkpoint written by an FSDP2 run loads into a plain single-process model and vice versa, and a
caller can load a subset of the saved state (e.g. only ``"model"``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

from neoxt.checkpoint.integrity import verify_checkpoint, verify_files, write_manifest
from neoxt.errors import CheckpointError
from neoxt.io import fsync_dir, write_text_atomic

LATEST_FILE = "latest"
CONFIG_FILE = "config.yml"
META_FILE = "meta.json"
DCP_METADATA_FILE = ".metadata"
_STEP_RE = re.compile(r"^global_step(\d+)$")
_TMP_RE = re.compile(r"^global_step\d+\.tmp(?:-(.+)-(\d+))?$")

def step_dir_name(iteration: int) -> str:
    return f"global_step{iteration}"


def _dist_info() -> tuple[bool, int]:
    """(process group initialised?, rank). Checkpoint files other than DCP's are written by rank 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def _barrier(distributed: bool, group: Any = None) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier(group=group)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    state: dict[str, Any],
    config_yaml: str,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` as ``<save_dir>/global_step<iteration>/`` and point ``latest`` at it.

    ``state`` is a (nested) dict of tensors and picklable values, e.g. ``{"model": sd, "optimizer":
    osd, "scheduler": {...}, "rng": {...}, "data": {...}}``. Under a process group every rank must call
    this (DCP is collective); rank 0 writes config, meta and ``latest``. An existing checkpoint of the
    same iteration is replaced. Returns the final checkpoint directory. ``neoxt.checkpoint.async_save``
    does the same with the write in the background.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tmp = begin_checkpoint(save_dir, iteration)
    distributed, _ = _dist_info()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not distributed)
    except (OSError, CheckpointException) as err:  # a full or read-only disk: one line, no half checkpoint
        abandon_checkpoint(tmp, err)
    return publish_checkpoint(save_dir, iteration, tmp, sorted(state.keys()), config_yaml, meta)


def begin_checkpoint(save_dir: str | os.PathLike, iteration: int) -> Path:
    """Create the empty directory DCP writes into, ``global_step<N>.tmp-<host>-<pid>`` (rank 0's name on
    every rank, so two jobs never share one), after removing those of dead writers; collective."""
    save_dir = Path(save_dir)
    distributed, rank = _dist_info()
    tmp = save_dir / _temp_name(iteration, distributed)
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(save_dir)
        tmp.mkdir()
    _barrier(distributed)
    return tmp


def abandon_checkpoint(tmp: Path, err: BaseException) -> NoReturn:
    """A write failed (full or read-only disk): remove ``tmp`` and raise one line; ``latest`` is untouched."""
    if _dist_info()[1] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(f"{tmp}: cannot write checkpoint ({_os_reason(err)}); the previous checkpoint "
                          "is unchanged") from None


def publish_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    tmp: Path,
    state_keys: list[str],
    config_yaml: str,
    meta: dict[str, Any] | None = None,
    group: Any = None,
) -> Path:
    """Once every rank's DCP files are in ``tmp``: rank 0 adds config and meta, the ranks hash the files
    into the checksum manifest, rank 0 fsyncs, renames the directory into place and only then points
    ``latest`` at it. ``group``: the process group of the collectives (a background save uses its own,
    so it never interleaves with training collectives)."""
    save_dir = Path(save_dir)
    distributed, rank = _dist_info()
    final = save_dir / step_dir_name(iteration)
    _barrier(distributed, group)
    try:
        _write_meta_and_manifest(tmp, iteration, state_keys, config_yaml, meta, rank, group)
    except OSError as err:
        abandon_checkpoint(tmp, err)
    if rank == 0:
        old = None
        if final.exists():
            old = save_dir / f"{final.name}.old.{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(save_dir)
        write_text_atomic(save_dir / LATEST_FILE, final.name + "\n", durable=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(distributed, group)
    return final


def _write_meta_and_manifest(tmp: Path, iteration: int, state_keys: list[str], config_yaml: str,
                             meta: dict[str, Any] | None, rank: int, group: Any) -> None:
    """Config and meta (rank 0), the checksum manifest (collective: each rank hashes a share), fsynced."""
    from neoxt import __version__

    if rank == 0:
        full_meta = dict(meta or {})
        full_meta["iteration"] = int(iteration)
        full_meta.setdefault("neoxt_version", __version__)
        full_meta.setdefault("time", time.time())
        full_meta["state_keys"] = list(state_keys)
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_manifest(tmp, extra=[tmp / CONFIG_FILE, tmp / META_FILE], group=group)
    if rank == 0:
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_file(f)
        fsync_dir(tmp)


def _os_reason(err: BaseException) -> str:
    """The OS error behind ``err`` (DCP wraps each rank's failure), as one phrase."""
    failures = getattr(err, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _temp_name(iteration: int, distributed: bool) -> str:
    """``global_step<N>.tmp-<host>-<pid>`` of rank 0, the same on every rank."""
    name = f"{step_dir_name(iteration)}.tmp-{socket.gethostname()}-{os.getpid()}"
    if distributed:
        import torch.distributed as dist

        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return name


def remove_dead_temps(save_dir: Path) -> list[Path]:
    """Delete ``global_step<N>.tmp*`` directories left by crashed writers: those of dead processes on this
    host, and the old unsuffixed ``.tmp`` form. Another live writer's are left alone."""
    from neoxt.checkpoint.lock import pid_alive

    removed = []
    for p in save_dir.iterdir():
        m = _TMP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        host, pid = m.group(1), m.group(2)
        if pid is None or (host == socket.gethostname() and not pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def point_latest(ckpt_dir: Path) -> None:
    """Make ``<save>/latest`` name ``ckpt_dir`` (an existing ``global_step<N>`` of that save directory)."""
    write_text_atomic(ckpt_dir.parent / LATEST_FILE, ckpt_dir.name + "\n", durable=True)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A complete neoxt checkpoint directory: DCP metadata and meta.json present."""
    p = Path(path)
    return (p / DCP_METADATA_FILE).is_file() and (p / META_FILE).is_file()


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``<save_dir>/latest`` names, or None when the directory holds none.

    Without a ``latest`` file (e.g. a crash between rename and pointer update) the highest complete
    ``global_step<N>`` directory is used. A ``latest`` naming a missing or incomplete directory is an
    error rather than a silent fresh start: that run's progress would be lost.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    pointer = save_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        target = save_dir / name
        if not _STEP_RE.match(name):  # never a path: "../../other_run/global_step60" would resume another run
            raise CheckpointError(f"{pointer}: names '{name}', expected a global_step<N> directory of {save_dir}")
        if not is_checkpoint_dir(target):
            raise CheckpointError(
                f"{pointer}: names '{name}', which is not a complete checkpoint directory in {save_dir}"
            )
        return target
    steps = list_checkpoints(save_dir)
    return steps[-1] if steps else None


def list_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """Complete ``global_step<N>`` directories, oldest first (``.tmp`` and stray dirs ignored)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for p in save_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_checkpoint_dir(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory resolves to its latest checkpoint; a ``global_step<N>`` directory to itself."""
    p = Path(path)
    if is_checkpoint_dir(p):
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if _TMP_RE.match(p.name):
        raise CheckpointError(f"{p}: an incomplete checkpoint (interrupted write); use the run directory")
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: holds no neoxt checkpoint (no 'latest' file and no global_step<N>/)")
    return latest


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    try:
        verify_files(ckpt_dir, META_FILE)
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing (not a neoxt checkpoint directory)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    for key in ("iteration", "consumed_tokens", "consumed_samples", "nan_count"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: '{key}' must be a non-negative integer, found {value!r}")
    return meta


def read_dcp_metadata(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's DCP index: flattened key ("model.embed.weight", "rng.rank0.torch", ...) →
    storage metadata (``TensorStorageMetadata`` has ``size`` and ``properties.dtype``).

    The one reader of a checkpoint's ``.metadata`` (a pickle) outside ``load_state``: unpickled through
    ``neoxt.checkpoint.safety``'s allowlist, so a hostile file is refused rather than run."""
    import pickle

    from neoxt.checkpoint.safety import safe_reader_and_planner

    try:
        verify_files(ckpt_dir, DCP_METADATA_FILE)
        return dict(safe_reader_and_planner(ckpt_dir)[0].read_metadata().state_dict_metadata)
    except (OSError, RuntimeError, ValueError, EOFError, AttributeError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{ckpt_dir}: cannot read the checkpoint's DCP metadata: {err}") from err


def read_config_text(ckpt_dir: str | os.PathLike) -> str:
    path = Path(ckpt_dir) / CONFIG_FILE
    try:
        verify_files(ckpt_dir, CONFIG_FILE)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing (not a neoxt checkpoint directory)") from err


def load_state(ckpt_dir: str | os.PathLike, state: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint into ``state`` in place and return it.

    ``state`` gives the keys and (for tensors) the shapes/placements to fill; it may be any subset of
    what was saved, e.g. ``{"model": model.state_dict()}``. Non-tensor values are replaced by the saved
    ones. Works with or without a process group.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from neoxt.checkpoint.safety import safe_reader_and_planner

    ckpt_dir = Path(ckpt_dir)
    if not is_checkpoint_dir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: not a complete neoxt checkpoint (missing {DCP_METADATA_FILE} or {META_FILE})")
    distributed, _ = _dist_info()
    verify_checkpoint(ckpt_dir)  # every file against checksums.sha256 (each rank checks a share)
    read_dcp_metadata(ckpt_dir)  # a refused pickle is reported here, not as DCP's fallback's complaint
    reader, planner = safe_reader_and_planner(ckpt_dir)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=not distributed)
    except CheckpointError:
        raise
    except (CheckpointException, RuntimeError, KeyError, ValueError) as err:
        ours = _our_error(err)
        if ours is not None:
            raise ours from None
        first = str(err).strip().splitlines()
        detail = _summarise_dcp_error(str(err)) or (first[0] if first else type(err).__name__)
        raise CheckpointError(f"{ckpt_dir}: state does not match the checkpoint: {detail}") from err
    return state


def _our_error(err: BaseException) -> CheckpointError | None:
    """The ``CheckpointError`` (e.g. a refused pickle) that DCP wrapped into its per-rank report, if any."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException):
        for failure in err.failures.values():
            found = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(found, CheckpointError):
                return found
            if isinstance(found, BaseException) and isinstance(found.__cause__ or found.__context__, CheckpointError):
                return found.__cause__ or found.__context__  # type: ignore[return-value]
    return None


def _summarise_dcp_error(text: str) -> str:
    """DCP wraps per-rank failures in a long multi-line report; keep the line that names the tensor."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("ValueError:", "RuntimeError:", "KeyError:")):
            return line.split(":", 1)[1].strip()[:300]
    return ""


def prune_checkpoints(save_dir: str | os.PathLike, keep_last_n: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last_n`` checkpoints (never the one ``latest`` names).

    Returns the removed directories. ``None`` or a value < 1 keeps everything.
    """
    if keep_last_n is None or keep_last_n < 1:
        return []
    save_dir = Path(save_dir)
    steps = list_checkpoints(save_dir)
    try:
        protected = latest_checkpoint(save_dir)
    except CheckpointError:
        protected = None
    removed = []
    for p in steps[:-keep_last_n]:
        if protected is not None and p.resolve() == protected.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
