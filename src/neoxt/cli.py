"""The `neoxt` command: one argparse subcommand per job, each a thin call into a module.

Each area owns a ``commands.py`` with ``register(subparsers)``; this file lists them explicitly.
Handlers import their heavy dependencies (torch, transformers) lazily so ``neoxt --help`` is fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from neoxt.errors import NeoxtError

COMMAND_MODULES: tuple[str, ...] = (
    "neoxt.config.commands",
    "neoxt.doctor",
    "neoxt.data.commands",
    "neoxt.train.commands",
    "neoxt.convert.commands",
    "neoxt.generate_commands",
    "neoxt.evaluate.commands",
    "neoxt.distributed.commands",
    "neoxt.ops.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neoxt",
        description="Train, post-train, convert, generate and evaluate language models (GPT-NeoX compatible).",
    )
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle checkpoint files (.metadata, .pt, .bin) without neoxt's allowlist, so any code their "
             "pickles name runs with your permissions; only for files whose author you trust (may be given "
             "anywhere on the command line; sets NEOXT_TRUST_CHECKPOINT=1 for launched ranks)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and tools swap it), not the one at setup."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    """neoxt's own messages at INFO on stderr, one plain line each; libraries stay at WARNING."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("neoxt")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# File-system failures a user fixes (a full or read-only disk, a file where a directory belongs): one line.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def _take_trust_flag(argv: list[str]) -> list[str]:
    """``--trust-checkpoint`` is accepted before or after the subcommand; it is recorded in the
    environment (``neoxt.checkpoint.safety.TRUST_ENV``) so ranks started by a launcher inherit it."""
    if "--trust-checkpoint" not in argv:
        return argv
    from neoxt.checkpoint.safety import TRUST_ENV

    os.environ[TRUST_ENV] = "1"
    logging.getLogger("neoxt").warning("--trust-checkpoint: checkpoint pickles are unpickled without restriction")
    return [a for a in argv if a != "--trust-checkpoint"]


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(_take_trust_flag(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.handler(args) or 0)
    except NeoxtError as err:
        print(f"neoxt: {err}" if not str(err).startswith("config error") else str(err), file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _OUTPUT_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"neoxt: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neoxt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
