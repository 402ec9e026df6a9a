"""Checkpoints that do not stop training while they are written (``async_save: true``).

A save has two halves. *Staging* copies the state dict into CPU buffers that belong to the saver;
the caller waits for this part only, and it is short because the buffers are allocated on the
first save and reused afterwards (``DefaultStager`` caches one buffer per source storage: a plain
``dcp.async_save`` allocates fresh ones every time, which on CPU costs as much as the write, see
``/work/shared/reference/stack-notes.md``). The *write* is ``dcp.async_save``'s background thread,
followed, in a second background thread, by the same atomic publish as a synchronous save
(``layout.publish_checkpoint``: fsync, rename ``.tmp`` into place, then ``latest``). So ``latest``
moves only once the files are complete, and a crash or ``kill -9`` during the write leaves the
previous checkpoint as the latest.

Only one save is in flight: the next ``save`` waits for the previous one first (its buffers are
reused), and a run waits for the in-flight save before it exits (``wait``), whether it ends, is
stopped by SIGTERM or fails. Under a process group the background barriers and DCP's plan exchange
run on a gloo group of their own, so they never interleave with the training collectives.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoxt.checkpoint.layout import (
    _dist_info,
    abandon_checkpoint,
    begin_checkpoint,
    publish_checkpoint,
    step_dir_name,
)
from neoxt.errors import CheckpointError


@dataclass(frozen=True)
class SaveTicket:
    """A submitted save: where it will be published, and how long the caller was blocked."""

    path: Path
    blocked_s: float


class AsyncCheckpointWriter:
    """Stage in the caller, write + publish in the background; one save in flight (module docstring)."""

    def __init__(self) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        # CPU: no pinned memory, no shared memory (thread mode), synchronous staging into cached buffers.
        self._stager = DefaultStager(StagingOptions(False, False, False, False))
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neoxt-checkpoint-publish")
        self._pending: Future | None = None
        self._pending_path: Path | None = None
        self._group: Any = None

    def _process_group(self, distributed: bool) -> Any:
        if distributed and self._group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # collective: every rank saves, so every rank gets here
        return self._group

    def save(self, save_dir: str | os.PathLike, iteration: int, state: dict[str, Any], config_yaml: str,
             meta: dict[str, Any] | None = None) -> SaveTicket:
        """Start saving ``state`` as ``global_step<iteration>``; returns once it is staged (a copy)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        began = time.perf_counter()
        self.wait()
        distributed, _ = _dist_info()
        group = self._process_group(distributed)
        tmp = begin_checkpoint(save_dir, iteration)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            warnings.filterwarnings("ignore", message=".*experimental.*")
            written = dcp.async_save(state, checkpoint_id=str(tmp), async_stager=self._stager,
                                     process_group=group, no_dist=not distributed)
        keys = sorted(state.keys())

        def finish() -> Path:
            try:
                written.result()
            except (OSError, CheckpointException) as err:  # a full or read-only disk: one line
                abandon_checkpoint(tmp, err)
            return publish_checkpoint(save_dir, iteration, tmp, keys, config_yaml, meta, group=group)

        self._pending = self._publisher.submit(finish)
        self._pending_path = Path(save_dir) / step_dir_name(iteration)
        return SaveTicket(self._pending_path, time.perf_counter() - began)

    @property
    def in_flight(self) -> Path | None:
        """The checkpoint being written, if any."""
        return self._pending_path if self._pending is not None and not self._pending.done() else None

    def wait(self) -> Path | None:
        """Block until the in-flight save (if any) is published; its path, or None when none was pending.
        A failed background write is raised here (``CheckpointError``)."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        try:
            return pending.result()
        except CheckpointError:
            raise
        except Exception as err:  # DCP wraps a writer's failure in its own exception types
            raise CheckpointError(f"{self._pending_path}: background checkpoint write failed: {err}") from err

    def close(self) -> None:
        """Wait for the in-flight save, then release the staging buffers and threads."""
        try:
            self.wait()
        finally:
            self._stager.close()
            self._publisher.shutdown(wait=True)
