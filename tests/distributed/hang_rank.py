"""A rank that hangs mid-run, for the step watchdog's end-to-end test; production code has no hook for it.

As a plugin (``NEOXT_PLUGINS=hang_rank`` for ``neoxt train``) with ``HANG_RANK="<rank>@<iteration>"``:
that rank stops at the start of that iteration, before its first collective, so the other ranks wait
for it in the step's all-reduce. It hangs inside a C call that holds the GIL (libc ``sleep`` through
``ctypes.PyDLL``), as a rank stuck in an extension or in the kernel does: its own watchdog thread cannot
run, so it is the *other* ranks' watchdogs that must end the job. The SIGTERM torchrun sends when it
tears the job down interrupts the sleep, and the rank then exits as a killed process would.
"""

from __future__ import annotations

import ctypes
import os
import signal

from neoxt.train import loop

HANG_SECONDS = 600


def hanging(step, rank: int, iteration: int):
    """``step`` (``loop._step``), except that ``rank`` never starts ``iteration``."""

    def step_or_hang(run, result):
        if run.rank == rank and run.progress.iteration + 1 == iteration:
            print(f"hang_rank: rank {rank} hangs at iteration {iteration}", flush=True)
            ctypes.PyDLL(None).sleep(ctypes.c_uint(HANG_SECONDS))  # holds the GIL; a signal ends it
            os._exit(128 + signal.SIGTERM)
        return step(run, result)

    return step_or_hang


if os.environ.get("HANG_RANK"):
    _rank, _, _iteration = os.environ["HANG_RANK"].partition("@")
    loop._step = hanging(loop._step, int(_rank), int(_iteration))
