"""The torchtitan side of ``benchmarks/mfu.py``: one row, one process, same shape / batch / timing as ours.

    torchrun --standalone --nproc-per-node 1 benchmarks/titan_peer.py --model-json '{...}' --seq 2048 \
        --micro-batch 4 --ac off --float8 off --warmup 3 --steps 6

``benchmarks/mfu.py --peer torchtitan`` runs this in a subprocess per row (torchtitan sets up its own
process group and CUDA state; a separate process also gives it the whole GPU memory). Written for
torchtitan 0.3.0 (its ``Trainer.Config`` / ``Configurable`` API; 0.2.x used TOML job configs).

What is torchtitan's and what is ours:

- torchtitan's own ``Trainer`` is built from a ``Trainer.Config`` made here in Python (the same object
  its ``--module/--config`` registry functions return): its LLaMA-3 model code with the dimensions of
  our shape (``--model-json``: hidden, layers, heads, kv heads, FFN width, vocabulary, tying, RoPE
  base), its FSDP2 + per-block compile + activation checkpointing (``FullAC`` when ``--ac on``, none
  when off), its float8 converter (``rowwise`` only: torchtitan 0.3.0 has no tensorwise recipe;
  ``lm_head`` left in bf16, as ours), its chunked loss, fused AdamW, grad clipping at 1.0, CUDA graphs
  and flex attention (its defaults for language models).
- The data is ours: random tokens from an in-process loader (no tokenizer or dataset files exist on
  the GPU machine), one document per sequence (positions 0..seq-1), so the block-causal mask is the
  causal one.
- The timing is ours: ``warmup`` calls of ``Trainer.train_step`` untimed, then ``steps`` timed ones
  between two device synchronisations, exactly as ``mfu.py`` times neoxt. MFU in the table is then
  computed from tokens/s with neoxt's FLOPs per token for the same shape; torchtitan's own FLOP count
  and peak (``num_flops_per_token``, ``get_peak_flops``) are reported beside it.

Prints one line ``TITAN_RESULT {json}`` at the end; exits 2 with one line on bad input or no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

RESULT_TAG = "TITAN_RESULT "


def _torchtitan_pieces():
    """Import torchtitan lazily (a CPU checkout without it can still import this module)."""
    import torch
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.tokenizer import BaseTokenizer

    class RandomTokens(BaseDataLoader):
        """Endless batches of random token ids: ``({"input", "positions"}, labels)`` on the CPU."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseDataLoader.Config):
            vocab_size: int = 32000
            seed: int = 0

        def __init__(self, config: Config, *, seq_len: int, local_batch_size: int, **_unused) -> None:
            self.config, self.seq_len, self.batch = config, seq_len, local_batch_size
            self.gen = torch.Generator().manual_seed(config.seed)

        def __iter__(self) -> Iterator[tuple[dict, torch.Tensor]]:
            positions = torch.arange(self.seq_len).expand(self.batch, self.seq_len).contiguous()
            while True:
                tokens = torch.randint(0, self.config.vocab_size, (self.batch, self.seq_len + 1), generator=self.gen)
                yield {"input": tokens[:, :-1], "positions": positions}, tokens[:, 1:]

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state_dict: dict) -> None:
            return None

    class VocabOnly(BaseTokenizer):
        """The trainer builds a tokenizer before the loader; random-token data needs only its size."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseTokenizer.Config):
            vocab_size: int = 32000

        def __init__(self, config: Config, **_unused) -> None:
            super().__init__()
            self.config = config

        def encode(self, *args, **kwargs) -> list[int]:
            raise NotImplementedError("the benchmark feeds token ids; nothing is encoded")

        def decode(self, *args, **kwargs) -> str:
            raise NotImplementedError("the benchmark feeds token ids; nothing is decoded")

        def get_vocab_size(self) -> int:
            return self.config.vocab_size

    return RandomTokens, VocabOnly


def model_spec(dims: dict, seq: int, float8: str, compile_model: bool):
    """torchtitan's LLaMA-3 model config with our shape's dimensions (flex attention, its default)."""
    from torchtitan.components.quantization import Float8LinearConverter
    from torchtitan.distributed.pipeline_parallel import pipeline_llm
    from torchtitan.models import llama3 as tl
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.protocols.model_spec import ModelSpec

    H, V, heads = dims["hidden_size"], dims["vocab_size"], dims["num_attention_heads"]
    norm = {"weight": tl._NORM_INIT["weight"]}
    config = tl.Llama3Model.Config(
        dim=H, vocab_size=V, enable_weight_tying=dims["tied"],
        tok_embeddings=Embedding.Config(num_embeddings=V, embedding_dim=H, param_init=tl._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=H, eps=dims["norm_eps"], param_init=norm),
        lm_head=Linear.Config(in_features=H, out_features=V, param_init=tl._output_linear_init(H)),
        layers=tl._build_llama3_layers(
            n_layers=dims["num_layers"], dim=H, n_heads=heads, n_kv_heads=dims["num_kv_heads"],
            hidden_dim=dims["intermediate_size"], fuse_qkv=True, attn_backend="flex",
            rope=ComplexRoPE.Config(dim=H // heads, max_seq_len=seq, theta=dims["rope_theta"], scaling="none"),
        ),
    )
    if float8 != "off":
        config = Float8LinearConverter.Config(
            recipe_name=float8, filter_fqns=["lm_head"], model_compile_enabled=compile_model,
        ).build().convert(config)
    return ModelSpec(name="llama3", flavor="neoxt-peer", model=config, parallelize_fn=tl.parallelize_llama,
                     pipelining_fn=pipeline_llm, post_optimizer_build_fn=None, state_dict_adapter=None)


def trainer_config(args, dims: dict):
    """A ``Trainer.Config`` for one benchmark row (no checkpoints, validation, profiling or logging)."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.config import CompileConfig, TrainingConfig
    from torchtitan.distributed.activation_checkpoint import FullAC
    from torchtitan.trainer import Trainer

    RandomTokens, VocabOnly = _torchtitan_pieces()
    spec = model_spec(dims, args.seq, args.float8, args.compile)
    total = args.warmup + args.steps
    return Trainer.Config(
        model_spec=spec,
        dump_folder=args.dump_folder,
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=dims["vocab_size"])),
        optimizer=default_adamw(lr=1e-4),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=1),
        training=TrainingConfig(local_batch_size=args.micro_batch, seq_len=args.seq, steps=total + 1, max_norm=1.0,
                                disable_cuda_graphs=not args.cuda_graphs),
        tokenizer=VocabOnly.Config(vocab_size=dims["vocab_size"]),
        dataloader=RandomTokens.Config(vocab_size=dims["vocab_size"]),
        metrics=MetricsProcessor.Config(log_freq=10**9),  # no per-step .item(): we time, it does not log
        activation_checkpoint=FullAC.Config() if args.ac == "on" else None,
        compile=CompileConfig(enable=args.compile, components=["model", "loss"]),
    )


def run(args) -> dict:
    import torch
    from torchtitan.tools import utils as tt_utils

    dims = json.loads(args.model_json)
    trainer = trainer_config(args, dims).build()
    try:
        data = trainer.batch_generator(trainer.dataloader)
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
        return {
            "step_s": dt, "tokens_per_s": tokens / dt,
            "titan_flops_per_token": own_flops, "titan_peak_flops": own_peak,
            "titan_mfu": own_flops * tokens / dt / own_peak if own_peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "cuda_graphs": not trainer.config.training.disable_cuda_graphs,
        }
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-json", required=True, help="shape: hidden_size, num_layers, ... (see model_spec)")
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--ac", choices=("on", "off"), default="off")
    p.add_argument("--float8", choices=("off", "rowwise"), default="off", help="torchtitan 0.3.0: rowwise only")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="torchtitan's default is on")
    p.add_argument("--dump-folder", default="/tmp/titan_peer")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not torch.cuda.is_available():
        print("titan_peer: torchtitan's trainer needs a CUDA GPU; none here", file=sys.stderr)
        return 2
    try:
        import torchtitan  # noqa: F401
    except ImportError as err:
        print(f"titan_peer: torchtitan is not importable ({err}); carry its wheels (scripts/gpu-kit.sh)",
              file=sys.stderr)
        return 2
    result = run(args)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
