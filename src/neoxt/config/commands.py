"""`neoxt config`: print the merged, resolved config as YAML with GPT-NeoX key names."""

from __future__ import annotations

import argparse
import sys


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The CONFIG… and --set arguments every config-driven subcommand takes."""
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML files, merged in order")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key (repeatable), e.g. --set train_iters=100",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the merged, resolved config (GPT-NeoX key names)")
    add_config_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neoxt.config import config_to_yaml, load_config

    cfg = load_config(args.configs, args.overrides)
    sys.stdout.write(config_to_yaml(cfg))
    return 0
