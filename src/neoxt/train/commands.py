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


def run_train(args: argparse.Namespace) -> int:
    # First thing: a walltime SIGUSR1/SIGTERM arriving while torch is imported, the config loaded or
    # the model built must not kill the worker (the default action); it is recorded and the run stops
    # before its first step, exit 0 (neoxt.train.signals.SignalFlag). The process group is joined
    # inside train() (neoxt.distributed.mesh.init_distributed, with the config's dist_timeout_s).
    from neoxt.train.signals import SignalFlag

    signals = SignalFlag().install()
    try:
        from neoxt.config import load_config
        from neoxt.train.objectives import load_plugins

        load_plugins()  # NEOXT_PLUGINS: modules that register objectives (neoxt.train.objectives)
        cfg = load_config(args.configs, args.overrides)
        result = _train_importing_neox_load(cfg, signals)
    finally:
        signals.restore()
    return 0 if result.status in ("finished", "signal", "exit_interval") else 1


def _train_importing_neox_load(cfg, signals):
    """``train``, with a GPT-NeoX/DeepSpeed checkpoint named by ``load`` imported on the fly into a
    temporary neoxt checkpoint first (``neoxt.convert.neox_load``); the run's saved config keeps the
    user's ``load``."""
    import tempfile
    from pathlib import Path

    from neoxt.config import config_to_yaml
    from neoxt.convert.neox_load import import_load_on_the_fly, neox_source
    from neoxt.distributed.mesh import dist_env
    from neoxt.train.loop import train
    from neoxt.train.setup import resolve_vocab

    if neox_source(cfg) is None:
        return train(cfg, None, signals=signals)
    if cfg.model.padded_vocab_size is None:
        cfg = resolve_vocab(cfg)  # to check the checkpoint's embedding against it
    rank = dist_env().rank  # the process group is joined later, inside train
    with tempfile.TemporaryDirectory(prefix="neoxt-neox-import-") as tmp:
        run_cfg = import_load_on_the_fly(cfg, Path(tmp), lambda m: print(m, flush=True) if rank == 0 else None)
        return train(run_cfg, config_to_yaml(cfg), signals=signals)


def run_demo(args: argparse.Namespace) -> int:
    from neoxt.train.demo import run_demo as _demo

    return _demo(args.workdir, iters=args.iters)
