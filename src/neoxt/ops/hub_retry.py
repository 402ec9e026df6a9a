"""Retrying Hub calls through 429 storms and 5xx hiccups: exponential backoff with full jitter.

The Hub answers 429 for minutes at a time when many jobs upload at once, so the defaults are long
(20 tries, 120 s to 3600 s, as the users' upload scripts had). Each wait is drawn uniformly between
``min_wait`` and the exponential ceiling ``min(max_wait, min_wait * 2**attempt)``, so parallel
publishers spread out instead of retrying in lockstep. Only rate limits, server errors and dropped
connections are retried; a 401/403/404 fails at once with its message.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from neoxt.errors import NeoxtError

log = logging.getLogger(__name__)

T = TypeVar("T")


class HubError(NeoxtError):
    """A Hub request failed for good (retries exhausted, or an error retrying cannot fix)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 20
    min_wait: float = 120.0
    max_wait: float = 3600.0

    def wait(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (1-based)."""
        ceiling = min(self.max_wait, self.min_wait * 2 ** (attempt - 1))
        return (rng or random).uniform(self.min_wait, max(self.min_wait, ceiling))


def status_of(err: BaseException) -> int | None:
    """The HTTP status of a hub client error, when there is one."""
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def is_retryable(err: BaseException) -> bool:
    """429, any 5xx, and transport errors (timeouts, resets) are worth another try."""
    code = status_of(err)
    if code is not None:
        return code == 429 or code >= 500
    if type(err).__name__ == "OfflineModeIsEnabled":  # a ConnectionError that no retry can fix
        return False
    try:
        from httpx2 import TransportError  # huggingface_hub's HTTP client
    except ModuleNotFoundError:  # pragma: no cover - other client versions
        TransportError = OSError
    return isinstance(err, TransportError | ConnectionError | TimeoutError)


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """``fn()``, retried by ``policy``; ``what`` names the call in log lines and the final error."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:  # the hub client raises many types; is_retryable sorts them
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if not is_retryable(err):
                raise HubError(f"{what}: {first}") from None
            attempt += 1
            if attempt > policy.max_retries:
                raise HubError(f"{what}: still failing after {policy.max_retries} retries ({first})") from None
            delay = policy.wait(attempt, rng)
            code = status_of(err)
            log.warning("publish: %s: %s; retry %d/%d in %.3g s", what, code or type(err).__name__, attempt,
                        policy.max_retries, delay)
            sleep(delay)
