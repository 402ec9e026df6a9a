"""`neoxt doctor`: the environment check that replaces a hand-run install test.

Each check is a small function returning (name, ok, detail). A check that is merely *absent*
(no GPU, no NCCL on a CPU build) is fine; the machine is unusable only when a check that every
run needs fails (torch import, a one-process torch.distributed init, a forward/backward pass).
``--train-check`` adds a real training run: the shipped corpus tokenized, 100 steps of a tiny model,
and the loss must fall by 10% (``neoxt.train.demo.train_check``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _torch() -> Check:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return Check("torch", True, f"{torch.__version__} ({build}, Python {sys.version.split()[0]})")


def _gpus() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("GPUs", True, "none (CPU training and tests work)", required=False)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Check("GPUs", True, f"{len(names)}: " + ", ".join(names), required=False)


def _bf16() -> Check:
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return Check("bf16", ok, "supported on GPU" if ok else "not supported on this GPU", required=False)
    x = torch.ones(4, 4, dtype=torch.bfloat16)
    ok = bool((x @ x).float().sum() == 64)
    return Check("bf16", ok, "CPU matmul works (slow; for tests)" if ok else "CPU bf16 matmul failed", required=False)


def _sdpa() -> Check:
    import torch
    import torch.nn.functional as F

    usable = []
    q = torch.randn(1, 2, 8, 16)
    F.scaled_dot_product_attention(q, q, q, is_causal=True)
    usable.append("math (CPU)")
    if torch.cuda.is_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qc = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qc, qc, qc, is_causal=True)
                usable.append(backend.name.lower())
            except RuntimeError:
                pass
    return Check("SDPA backends", True, ", ".join(usable))


def _backends() -> Check:
    import torch.distributed as dist

    found = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if ok]
    return Check("collective backends", bool(found), ", ".join(found) or "none", required=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_init() -> Check:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return Check("torch.distributed init", True, "already initialised")
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            t = torch.ones(3)
            dist.all_reduce(t)
            ok = bool(t.sum() == 3)
        finally:
            dist.destroy_process_group()
    return Check("torch.distributed init", ok, "one-process gloo all_reduce works" if ok else "all_reduce gave a wrong result")


def _train_step() -> Check:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    return Check("forward/backward", ok, "a tiny model trains" if ok else "gradients missing or non-finite")


_PACKAGES = ("transformers", "tokenizers", "safetensors", "datasets", "huggingface_hub", "numpy", "lm_eval", "wandb",
             "tensorboard")


def _packages() -> Check:
    versions = []
    missing = []
    for name in _PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    required_missing = [m for m in missing if m not in ("lm_eval", "wandb", "tensorboard")]
    detail = ", ".join(versions) + (f"; not installed: {', '.join(missing)}" if missing else "")
    return Check("dependencies", not required_missing, detail)


CHECKS: tuple[Callable[[], Check], ...] = (_torch, _gpus, _bf16, _sdpa, _backends, _dist_init, _train_step, _packages)


def _training() -> Check:
    from neoxt.train.demo import MIN_DROP, TRAIN_CHECK, train_check

    drop = train_check()
    what = f"{TRAIN_CHECK['train_iters']} steps on the shipped corpus: {drop.describe()}"
    return Check("training", drop.fell_enough, what if drop.fell_enough else f"{what}, not by {MIN_DROP:.0%}")


def run_checks(train: bool = False) -> list[Check]:
    results = []
    for fn in (*CHECKS, _training) if train else CHECKS:
        name = fn.__name__.strip("_")
        try:
            results.append(fn())
        except Exception as err:  # a check that crashes is a failed check, reported in the table
            results.append(Check(name, False, f"{type(err).__name__}: {err}"))
    return results


def format_table(results: list[Check]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check'.ljust(width)}  status  detail", f"{'-' * width}  ------  ------"]
    for r in results:
        status = "ok" if r.ok else ("FAIL" if r.required else "warn")
        lines.append(f"{r.name.ljust(width)}  {status.ljust(6)}  {r.detail}")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check that this machine can run neoxt (torch, GPUs, bf16, SDPA, distributed)")
    p.add_argument("--train-check", action="store_true",
                   help="also train a tiny model on the shipped corpus and require its loss to fall by 10%%")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace | None) -> int:
    results = run_checks(train=bool(getattr(args, "train_check", False)))
    print(format_table(results))
    usable = all(r.ok for r in results if r.required)
    print("\nneoxt is usable on this machine." if usable else "\nneoxt is NOT usable on this machine (see FAIL rows).")
    return 0 if usable else 1
