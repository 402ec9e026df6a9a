"""A per-process watchdog that turns a hung training job into an exit with one clear line.

Why: when one rank dies or hangs mid-run, the others wait inside a collective (an all-reduce, an
FSDP all-gather) that only the process group's timeout bounds: ``dist_timeout_s``, 30 minutes by
default, and then the error names a collective, not the rank. The training loop reports progress
here when a step completes (``pet``); a daemon thread (standard library: it must run while the main
thread is stuck in C++) exits the process once no progress was reported for ``step_timeout_s``:
one line on stderr naming this rank, the iteration, the phase and what to do, the Python stacks of
all threads (``faulthandler``), the heartbeat marked failed (``on_fire``, rank 0 only, as rank 0 writes
it: ``neoxt status`` then says FAILED; when another rank fires, rank 0 is torn down and it says
CRASHED), and ``os._exit(EXIT_CODE)``; torchrun then tears down the other ranks.

It must never fire in a healthy run, so only time while *armed* counts:

- the loop arms it after the first step completes: start-up, a checkpoint load and the first step
  (``torch.compile``, first collectives) are bounded by ``dist_startup_timeout_s`` / ``dist_timeout_s``;
- phases that may legitimately outlast a step are ``suspended``: a checkpoint save (``Checkpointer``)
  and lm-eval's ``eval_tasks``; progress inside a long phase is reported with ``keep_alive``
  (each validation batch, each prompt REINFORCE samples for);
- a single process has no peer to wait for, so ``for_run`` gives it a disabled watchdog: a lone
  process that hangs has nobody to tear down, and a slow debug run on a laptop must not be killed.

``keep_alive`` and ``suspended`` are also module functions acting on the process's running watchdog
(a no-op without one), so a phase deep inside a component reports itself without plumbing.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

EXIT_CODE = 124  # as GNU timeout's "timed out": distinct from an error (1) and a config error (2)
DEFAULT_STEP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Stall:
    """What the watchdog saw when it fired."""

    rank: int
    world_size: int
    iteration: int  # the iteration the loop was in (the last completed + 1)
    phase: str
    waited_s: float
    timeout_s: float

    def message(self) -> str:
        """The one stderr line: who, where, how long, what to do."""
        return (f"neoxt watchdog: rank {self.rank} of {self.world_size} made no progress for "
                f"{self.waited_s:.0f} s in iteration {self.iteration} ({self.phase}); step_timeout_s is "
                f"{self.timeout_s:g} s. Probably another rank died or hung and this one waits for it in a "
                "collective: look for the first error in the other ranks' logs (this rank's stacks follow). "
                f"If steps are legitimately this slow, raise step_timeout_s (0 turns the watchdog off). "
                f"Exiting with code {EXIT_CODE}.")

    def reason(self) -> str:
        """The short form for ``heartbeat.json`` (``neoxt status`` shows it)."""
        return (f"watchdog: rank {self.rank} made no progress for {self.waited_s:.0f} s in iteration "
                f"{self.iteration} ({self.phase}; step_timeout_s {self.timeout_s:g})")


_ACTIVE: Watchdog | None = None  # the running watchdog of this process (module functions act on it)


class Watchdog:
    """Exits the process when the armed loop reports no progress for ``timeout_s`` (module docstring).

    ``timeout_s`` 0 disables it: every method is then a cheap no-op and no thread starts.
    ``exit`` / ``clock`` / ``stream`` / ``poll_s`` are injectable for tests.
    """

    def __init__(self, timeout_s: float, rank: int = 0, world_size: int = 1, *,
                 on_fire: Callable[[Stall], None] | None = None, exit: Callable[[int], object] = os._exit,
                 clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None,
                 poll_s: float | None = None):
        self.timeout_s, self.rank, self.world_size = float(timeout_s), rank, world_size
        self.on_fire, self._exit, self._clock, self._stream = on_fire, exit, clock, stream
        self.poll_s = poll_s if poll_s is not None else min(max(self.timeout_s / 10, 0.05), 5.0)
        self._lock = threading.Lock()
        self._armed = False
        self._suspended = 0
        self._last = clock()
        self._iteration, self._phase = 0, "start-up"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: Stall | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    # ------------------------------------------------------------------ what the loop reports
    def pet(self, iteration: int, phase: str = "training step") -> None:
        """Progress: the loop is now in ``iteration`` doing ``phase``; the timer restarts."""
        with self._lock:
            self._iteration, self._phase, self._last = iteration, phase, self._clock()

    def arm(self) -> None:
        """From now on, time without progress counts (the loop calls it after the first step)."""
        with self._lock:
            self._armed, self._last = True, self._clock()

    def keep_alive(self, phase: str | None = None) -> None:
        """Progress inside a long phase (a validation batch, a prompt sampled): the timer restarts."""
        with self._lock:
            self._last = self._clock()
            if phase is not None:
                self._phase = phase

    @contextmanager
    def suspended(self, phase: str) -> Iterator[None]:
        """A phase that may legitimately outlast any step (a checkpoint save, lm-eval): not timed."""
        with self._lock:
            self._suspended += 1
            before, self._phase = self._phase, phase
        try:
            yield
        finally:
            with self._lock:
                self._suspended -= 1
                self._phase, self._last = before, self._clock()

    # ------------------------------------------------------------------ the thread
    def check(self) -> Stall | None:
        """One look: fire (and return what was seen) when armed, not suspended and overdue."""
        with self._lock:
            waited = self._clock() - self._last
            if not self.enabled or not self._armed or self._suspended or waited < self.timeout_s:
                return None
            stall = Stall(self.rank, self.world_size, self._iteration, self._phase, waited, self.timeout_s)
        self._fire(stall)
        return stall

    def _fire(self, stall: Stall) -> None:
        self.fired = stall
        stream = self._stream or sys.stderr
        try:
            stream.write(stall.message() + "\n")
            stream.flush()
            faulthandler.dump_traceback(file=stream, all_threads=True)
        except (OSError, ValueError, AttributeError) as err:  # a stream without a file descriptor
            stream.write(f"(no stacks: {err})\n")
        try:
            if self.on_fire is not None:
                self.on_fire(stall)
        except Exception as err:  # the exit below must happen whatever the callback does
            stream.write(f"neoxt watchdog: could not mark the run failed: {err}\n")
        stream.flush()
        self._exit(EXIT_CODE)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.check() is not None:
                return

    def start(self) -> Watchdog:
        """Start the daemon thread (not when disabled) and make this the process's watchdog."""
        global _ACTIVE
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="neoxt-watchdog", daemon=True)
            self._thread.start()
            _ACTIVE = self
        return self

    def stop(self) -> None:
        """Stop watching (the run ends, or fails: its own error is the message then)."""
        global _ACTIVE
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(self.poll_s * 2, 1.0))
        self._thread = None
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def for_run(timeout_s: float, rank: int, world_size: int,
            on_fire: Callable[[Stall], None] | None = None) -> Watchdog:
    """The training loop's watchdog: disabled for a single process (see the module docstring)."""
    return Watchdog(timeout_s if world_size > 1 else 0.0, rank, world_size, on_fire=on_fire)


def keep_alive(phase: str | None = None) -> None:
    """``Watchdog.keep_alive`` on the process's running watchdog; a no-op without one."""
    dog = _ACTIVE
    if dog is not None:
        dog.keep_alive(phase)


@contextmanager
def suspended(phase: str) -> Iterator[None]:
    """``Watchdog.suspended`` on the process's running watchdog; a no-op without one."""
    dog = _ACTIVE
    if dog is None:
        yield
        return
    with dog.suspended(phase):
        yield
