"""The one progress display for long work (tokenizing, converting, generating, evaluating).

DESIGN.md's convention: a tqdm bar on a terminal, and off a terminal (a SLURM log, a pipe) one plain
line on stderr at most every ``every_s`` seconds plus one at the end, so logs stay short and still
show that the job moves.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Progress:
    """``update(n)`` as work completes, ``close()`` at the end.

    ``describe(done)`` writes the log line's text (default ``"<desc>: <done>/<total> <unit>s"``);
    ``postfix`` in ``update`` is shown beside the terminal bar. ``disable`` shows nothing at all.
    """

    def __init__(self, total: float | None, desc: str, unit: str = "item", every_s: float = 10.0, *,
                 initial: float = 0, disable: bool = False, describe: Callable[[float], str] | None = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = initial
        self.describe = describe or self._default_line
        self.disabled = disable
        self.started = self.last_log = time.monotonic()
        self.logged_at = -1
        self.bar: Any = None
        if not disable and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit == "B",
                            unit_divisor=1024, dynamic_ncols=True, leave=False)

    def _default_line(self, done: float) -> str:
        """tqdm's own meter (count, rate, ETA) without carriage returns; bytes scaled to KiB/MiB."""
        from tqdm import tqdm

        return tqdm.format_meter(done, self.total, time.monotonic() - self.started, prefix=self.desc,
                                 unit=self.unit, unit_scale=self.unit == "B", unit_divisor=1024, ncols=0)

    def update(self, n: float = 1, postfix: str | None = None) -> None:
        self.done += n
        if self.disabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_log >= self.every_s or (self.total is not None and self.done >= self.total > 1):
            self._log(now)

    def _log(self, now: float) -> None:
        self.last_log, self.logged_at = now, self.done
        print(self.describe(self.done), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], desc: str, unit: str = "item", total: int | None = None,
          every_s: float = 10.0) -> Iterator[T]:
    """``items`` unchanged, with progress shown as they are consumed."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(total, desc, unit, every_s)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


def tracker(desc: str, unit: str = "item") -> Callable[[Iterable[T]], Iterator[T]]:
    """``track`` with its label bound, for APIs that take a ``progress=`` wrapper (default ``iter``)."""
    return lambda items: track(list(items), desc, unit)
