"""The walltime-signal flag of ``neoxt train``; standard library only, so it can be installed before
torch is imported (that alone takes seconds)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class SignalFlag:
    """SIGTERM / SIGUSR1 → finish the current step, save, exit 0 (a scheduler's walltime warning).

    ``neoxt train`` installs one before anything else (config loading, model building, a checkpoint
    load take seconds to minutes), so a signal during start-up is recorded instead of killing the
    worker; ``train`` then stops before its first step, saving nothing: the state is still the one it
    started from (the resumed checkpoint, or the seed), so the next job of a chain loses nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> SignalFlag:
        """Route the signals here (main thread only; a second call is a no-op)."""
        if not self._old and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Give the signals back to the handlers that were installed before ``install``."""
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> SignalFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
