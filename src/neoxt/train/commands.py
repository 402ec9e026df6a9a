"""`neoxt train` and `neoxt demo`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from neoxt.config.commands import add_config_arguments

    p = sub.add_parser(
        "train",
        help="train or post-train a model from GPT-NeoX-style YAML configs (resumes automatically from 'save')",
    )
    add_config_arguments(p)
    p.set_defaults(handler=run_train)

    d = sub.add_parser("demo", help="prepare the shipped corpus, train a tiny model on CPU, print a sample")
    d.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and logs go (default runs/demo)")
    d.add_argument("--iters", type=int, default=None, help="training iterations (default: configs/demo.yml)")
    d.set_defaults(handler=run_demo)


def _init_distributed() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); nothing for a single process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def run_train(args: argparse.Namespace) -> int:
    # First thing: a walltime SIGUSR1/SIGTERM arriving while torch is imported, the config loaded or
    # the model built must not kill the worker (the default action); it is recorded and the run stops
    # before its first step, exit 0 (neoxt.train.loop.SignalFlag).
    from neoxt.train.signals import SignalFlag

    signals = SignalFlag().install()
    try:
        from neoxt.config import load_config
        from neoxt.train.loop import train

        cfg = load_config(args.configs, args.overrides)
        _init_distributed()
        result = train(cfg, None, signals=signals)
    finally:
        signals.restore()
    return 0 if result.status in ("finished", "signal", "exit_interval") else 1


def run_demo(args: argparse.Namespace) -> int:
    from neoxt.train.demo import run_demo as _demo

    return _demo(args.workdir, iters=args.iters)
