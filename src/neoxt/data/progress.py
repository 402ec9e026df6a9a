"""One progress display for the data toolbox's long steps (downloads, merges, counts, training a tokenizer).

On a terminal it is a tqdm bar (rate and ETA); otherwise one log line at most every ``every_s``
seconds in tqdm's own format, so batch jobs get rates and ETAs in their logs without carriage
returns. ``progress_bar`` is the single place to repoint if the project adopts one shared helper.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class _LogProgress:
    """tqdm's ``update``/``close`` interface, printing a plain line now and then."""

    def __init__(self, total: float | None, desc: str, unit: str, every_s: float, initial: float):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = initial
        self.start = self.last = time.monotonic()

    def update(self, n: float = 1) -> None:
        from tqdm import tqdm

        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            line = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                     unit_scale=self.unit == "B", unit_divisor=1024, ncols=0)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: float | None, desc: str, unit: str = "it", initial: float = 0, every_s: float = 10.0) -> Any:
    """A progress object with ``update(n)`` and ``close()`` (also a context manager)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit == "B",
                    unit_divisor=1024, dynamic_ncols=True)
    return _LogProgress(total, desc, unit, every_s, initial)
