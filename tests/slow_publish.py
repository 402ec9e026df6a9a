"""Slow checkpoint publishing for tests that kill or race a writer mid-checkpoint; production code has
no hook for it. As a plugin (``NEOXT_PLUGINS=slow_publish`` for ``neoxt train``, or imported first by a
script) with ``SLOW_PUBLISH="<seconds>@<iteration>"`` (or ``"<seconds>"`` for every checkpoint) set,
the publish sleeps once the checkpoint's files are written and before the rename. In-process tests
monkeypatch ``neoxt.checkpoint.layout._write_meta_and_manifest`` with ``sleeping(...)`` instead."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from neoxt.checkpoint import layout


def sleeping(write: Callable, spec: str) -> Callable:
    """``write`` (layout's last step before the rename), then a sleep when ``spec`` names this iteration."""
    seconds, _, only = spec.partition("@")

    def write_then_sleep(tmp, iteration, *args, **kwargs):
        write(tmp, iteration, *args, **kwargs)
        if not only or int(only) == iteration:
            time.sleep(float(seconds))

    return write_then_sleep


if os.environ.get("SLOW_PUBLISH"):
    layout._write_meta_and_manifest = sleeping(layout._write_meta_and_manifest, os.environ["SLOW_PUBLISH"])
