"""The torchtitan side of ``benchmarks/mfu.py``: one row, one process, same shape / batch / timing as ours.

    torchrun --standalone --nproc-per-node 1 benchmarks/titan_peer.py --model-json '{...}' --seq 2048 \
        --micro-batch 4 --ac off --float8 off --warmup 3 --steps 5

``benchmarks/mfu.py --peer torchtitan`` runs this in a subprocess per row (torchtitan sets up its own
process group and CUDA state; a separate process also gives it the whole GPU memory).

Written for torchtitan 0.2.2 (``JobConfig`` dataclasses + ``TrainSpec`` registry), the release built
alongside torch 2.11 (the GPU image's torch): torchtitan 0.3.0's trainer imports
``torch.distributed.fsdp.DataParallelMeshDims``, which torch gained after the 2.11 branch cut.

What is torchtitan's and what is ours:

- torchtitan's own ``Trainer`` with its ``JobConfig`` (the object its TOML/CLI parsing yields, filled
  here in Python): its LLaMA-3 model code with the dimensions of our shape (``--model-json``), its
  FSDP2 + per-block compile + activation checkpointing (``full`` when ``--ac on``, ``none`` when off),
  its float8 converter (``recipe_name`` tensorwise or rowwise; ``output`` left in bf16, as ours), its
  cross-entropy loss, fused AdamW, grad clipping at 1.0, SDPA causal attention (its default).
- The data is ours: random tokens fed straight to ``Trainer.train_step`` (no tokenizer or dataset files
  exist on the GPU machine; the train spec registered here has no tokenizer or dataloader builders).
- The timing is ours: ``warmup`` calls of ``train_step`` untimed, then ``steps`` timed ones between two
  device synchronisations, exactly as ``mfu.py`` times neoxt. ``mfu.py`` computes TFLOP/s and MFU with
  neoxt's FLOPs per token; torchtitan's own count and peak are reported beside it, as is its
  parameter count (checked against ours, so the two sides provably ran the same shape).

Prints one line ``TITAN_RESULT {json}`` at the end; exits 2 with one line on bad input or no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator

RESULT_TAG = "TITAN_RESULT "
SPEC_NAME = "neoxt_peer"


def ffn_args(dim: int, hidden: int) -> dict:
    """``multiple_of`` / ``ffn_dim_multiplier`` that make torchtitan's LLaMA FFN exactly ``hidden`` wide.

    torchtitan sizes it as ``multiple_of * ceil(int(m * int(8 * dim / 3)) / multiple_of)``; with
    ``multiple_of = hidden`` and ``m`` so that the inner product lands in ``(0, hidden]`` that is ``hidden``."""
    base = int(2 * (4 * dim) / 3)
    return {"multiple_of": hidden, "ffn_dim_multiplier": hidden / base}


def titan_ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """torchtitan 0.2.2's ``FeedForward`` width rule (``models/llama3/model/model.py``), for checking."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def register_spec(dims: dict) -> None:
    """torchtitan's LLaMA-3 train spec with one flavor, ``peer``, of our dimensions; no data builders."""
    from torchtitan.models.llama3 import TransformerModelArgs, get_train_spec
    from torchtitan.protocols.train_spec import register_train_spec

    if dims["tied"]:
        raise ValueError("torchtitan 0.2.2's LLaMA-3 has no tied output layer; use an untied shape")
    H = dims["hidden_size"]
    model_args = TransformerModelArgs(
        dim=H, n_layers=dims["num_layers"], n_heads=dims["num_attention_heads"], n_kv_heads=dims["num_kv_heads"],
        vocab_size=dims["vocab_size"], norm_eps=dims["norm_eps"], rope_theta=dims["rope_theta"],
        **ffn_args(H, dims["intermediate_size"]),
    )
    spec = dataclasses.replace(get_train_spec(), model_args={"peer": model_args}, build_tokenizer_fn=None,
                               build_dataloader_fn=None, build_validator_fn=None, state_dict_adapter=None)
    register_train_spec(SPEC_NAME, spec)


def job_config(args):
    """A ``JobConfig`` for one benchmark row (no checkpoints, validation, profiling or metric logging)."""
    from torchtitan.config import JobConfig

    jc = JobConfig()
    jc.job.dump_folder = args.dump_folder
    jc.model.name, jc.model.flavor = SPEC_NAME, "peer"
    if args.float8 != "off":
        jc.model.converters = ["quantize.linear.float8"]
        jc.quantize.linear.float8.recipe_name = args.float8
        jc.quantize.linear.float8.filter_fqns = ["output"]
    jc.training.local_batch_size, jc.training.seq_len = args.micro_batch, args.seq
    jc.training.steps, jc.training.max_norm = args.warmup + args.steps + 1, 1.0
    jc.optimizer.lr = 1e-4
    jc.lr_scheduler.warmup_steps = 1
    jc.activation_checkpoint.mode = "full" if args.ac == "on" else "none"
    jc.compile.enable = args.compile
    jc.metrics.log_freq = 10**9  # step 1 logs once (warm-up); no per-step .item() while timed
    return jc


def random_batches(vocab: int, batch: int, seq: int) -> Iterator[tuple[dict, object]]:
    """Endless ``({"input": tokens}, labels)`` of random ids on the CPU, as torchtitan's loaders yield."""
    import torch

    gen = torch.Generator().manual_seed(0)
    while True:
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        yield {"input": tokens[:, :-1]}, tokens[:, 1:]


def run(args) -> dict:
    import torch
    from torchtitan.tools import utils as tt_utils
    from torchtitan.train import Trainer

    dims = json.loads(args.model_json)
    register_spec(dims)
    trainer = Trainer(job_config(args))
    try:
        # through the trainer's own generator, which keeps the token / data-time counts its logging reads
        data = trainer.batch_generator(random_batches(dims["vocab_size"], args.micro_batch, args.seq))
        device = trainer.device
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            trainer.step += 1
            trainer.train_step(data)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.step += 1
            trainer.train_step(data)
        torch.cuda.synchronize(device)
        dt = (time.perf_counter() - t0) / args.steps
        tokens = args.micro_batch * args.seq
        own_flops = trainer.metrics_processor.num_flops_per_token
        own_peak = tt_utils.get_peak_flops(torch.cuda.get_device_name(device))
        params = sum(p.numel() for m in trainer.model_parts for p in m.parameters())
        return {
            "step_s": dt, "titan_params": params, "titan_flops_per_token": own_flops, "titan_peak_flops": own_peak,
            "titan_mfu": own_flops * tokens / dt / own_peak if own_peak and not math.isnan(own_peak) else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-json", required=True, help="shape: hidden_size, num_layers, ... (see register_spec)")
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--ac", choices=("on", "off"), default="off")
    p.add_argument("--float8", choices=("off", "tensorwise", "rowwise"), default="off")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--dump-folder", default="/tmp/titan_peer")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not torch.cuda.is_available():
        print("titan_peer: torchtitan's trainer needs a CUDA GPU; none here", file=sys.stderr)
        return 2
    try:
        import torchtitan.train  # noqa: F401
    except ImportError as err:
        print(f"titan_peer: torchtitan is not importable ({err}); carry its wheels (scripts/gpu-kit.sh)",
              file=sys.stderr)
        return 2
    from torchtitan.tools.logging import init_logger

    init_logger()  # torchtitan's INFO lines (model size, float8 swap, memory) go to mfu.py's --peer-log
    result = run(args)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
