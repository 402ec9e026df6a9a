"""Joining the process group within a start-up timeout, and stoppable while waiting.

``init_process_group``'s own rendezvous blocks in C++ for the whole collective timeout (30 minutes by
default) and Python signal handlers cannot run meanwhile: with a stale ``WORLD_SIZE=2`` left in the
shell and no peer, ``neoxt train`` sat silent for 12 minutes and ignored SIGTERM. Here the store is
built and joined in short steps from Python: every rank registers itself, ranks poll for the others,
and the wait ends

- when all ``WORLD_SIZE`` ranks joined (the store then serves the process group as usual),
- after ``dist_startup_timeout_s`` with one line naming the missing ranks and the env vars, or
- at once on SIGTERM/SIGINT (handlers that raise, installed only for the wait).

Under torchrun's agent (``TORCHELASTIC_USE_AGENT_STORE``) the agent already brought every worker up
and supervises them, so the usual rendezvous is kept.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from neoxt.errors import NeoxtError

log = logging.getLogger(__name__)
_POLL_S = 0.2


class StartupError(NeoxtError):
    """The ranks of a distributed run did not all come up (or the wait was interrupted)."""


def _env_text(rank: int, world: int) -> str:
    return (f"RANK={rank} WORLD_SIZE={world} MASTER_ADDR={os.environ.get('MASTER_ADDR', '(unset)')} "
            f"MASTER_PORT={os.environ.get('MASTER_PORT', '(unset)')}")


_HINT = "left over from another job? unset them, or start every rank with `neoxt launch` / torchrun"


@contextlib.contextmanager
def _signals_raise(rank: int, world: int) -> Iterator[None]:
    """SIGTERM/SIGINT raise ``StartupError`` during the ``with`` block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise StartupError(f"received {signal.Signals(signum).name} while waiting for the other ranks "
                           f"({_env_text(rank, world)}); stopped before training")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _connect(rank: int, world: int, addr: str, port: int, deadline: float, timeout_s: float):
    import torch.distributed as dist

    if rank == 0:
        try:
            return dist.TCPStore(addr, port, world, is_master=True, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:
            raise StartupError(f"rank 0 cannot serve the rendezvous at {addr}:{port}: "
                               f"{str(err).splitlines()[0]} ({_env_text(rank, world)})") from None
    while True:  # short attempts, so a signal is handled between them
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartupError(f"rank {rank}: rank 0 never answered at {addr}:{port} "
                               f"({_env_text(rank, world)}; {_HINT})")
        try:  # a silent probe first: TCPStore's own failed attempts log C++ stack traces
            socket.create_connection((addr, port), timeout=min(1.0, left)).close()
            return dist.TCPStore(addr, port, world, is_master=False, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=max(left, 1.0)))
        except (OSError, RuntimeError, ValueError):
            time.sleep(_POLL_S)


def startup_store(rank: int, world: int, startup_timeout_s: float, timeout_s: float):
    """A joined ``TCPStore`` for ``init_process_group(store=...)``, or None under torchrun's agent."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not port.isdigit():
        raise StartupError(f"WORLD_SIZE={world} asks for a distributed run but MASTER_ADDR/MASTER_PORT are not set "
                           f"({_env_text(rank, world)}; {_HINT})")
    deadline = time.monotonic() + startup_timeout_s
    log.info("process group: rank %d waiting up to %g s for %d ranks at %s:%s", rank, startup_timeout_s, world, addr, port)
    with _signals_raise(rank, world):
        store = _connect(rank, world, addr, int(port), deadline, timeout_s)
        store.set(f"neoxt/joined/{rank}", "1")
        while True:
            missing = [r for r in range(world) if not store.check([f"neoxt/joined/{r}"])]
            if not missing:
                return store
            if time.monotonic() >= deadline:
                raise StartupError(f"rank {rank}: rank(s) {missing} of WORLD_SIZE={world} did not join within "
                                   f"{startup_timeout_s:g} s (dist_startup_timeout_s; {_env_text(rank, world)}; {_HINT})")
            time.sleep(_POLL_S)
