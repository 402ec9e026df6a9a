"""Training throughput and MFU of 1B and 7B-class LLaMA shapes (FSDP2 + compile, float8), torchtitan beside.

    python benchmarks/mfu.py                                  # one GPU: the whole grid below
    python benchmarks/mfu.py --peer torchtitan --budget-s 440 --json mfu.json   # + torchtitan rows
    python benchmarks/mfu.py --rows 'neoxt/llama-7b/*/off'    # a subset (fnmatch on row keys)
    python benchmarks/mfu.py --list                           # print the row keys and exit
    python benchmarks/mfu.py --tiny                           # CPU smoke run of the same code path

A row is ``side/shape/seq/float8``: side ``neoxt`` or ``torchtitan``; shape ``llama-1.1b``
(TinyLlama-1.1B dims), ``llama-7b`` (LLaMA-2-7B dims; ``gpt-neox-1b`` on request); seq 2048 / 8192;
float8 ``off`` (bf16), ``tensorwise`` or ``rowwise`` (neoxt's ``float8_recipe`` through
``neoxt.distributed.float8``; torchtitan's ``quantize.linear.float8.recipe_name``). The
order is by priority (every bf16 row first), so a ``--budget-s`` that runs out drops float8 rows
first; a row that no longer fits the budget is listed as not run. Each row: ``--warmup`` untimed
steps (compile happens there), then ``--steps`` timed ones between two device synchronisations.

Each shape fixes the tokens per step (micro-batch = tokens // seq) and activation checkpointing
(``llama-7b``: full AC, 8192 tokens; the 1B shapes: no AC, 16384 tokens). On one GPU FSDP2 still
wraps the model on a one-rank mesh (bf16 params, fp32 master weights and reduce), as a multi-GPU
run would. 7B on one H200: fp32 params + grads + AdamW states are 16 B/param (108 GB for 6.7B; the
optimizer is torch's fused AdamW, which needs no per-param temporary), so the row is planned from an
estimate against the device's memory: if the estimate does not fit, the
row runs with fewer layers of the same width and says so (``layers`` column and note); an OOM at run
time retries once with 3/4 of the layers, also said in the note. MFU per layer hardly depends on depth.

The neoxt step is what ``neoxt train`` does per micro-batch: forward with the chunked output
head + loss (``neoxt.train.chunked_loss``), backward, grad-norm clip at 1.0, AdamW from
``neoxt.train.optim``. The torchtitan row (``benchmarks/titan_peer.py``, torchtitan 0.2.2, one
subprocess each) builds torchtitan's own trainer with the same dimensions (its parameter count is
checked against ours), batch, AC and float8 setting and is timed the same way. TFLOP/s and MFU of
both sides use ``neoxt.model.flops_per_token`` (6N + attention, the PaLM/Megatron convention
torchtitan also uses) against ``--peak-tflops`` (default 989: H100/H200 SXM dense bf16, also for
float8 rows); torchtitan's self-reported MFU is in the JSON. Never asserts a
timing. Data is random tokens. On CPU (``--tiny``), float8 and torchtitan rows are refused in one line
each (they need a CUDA GPU) and listed as such.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from neoxt.config.schema import ModelConfig, OptimizerConfig, ParallelismConfig, RunConfig, TrainingConfig
from neoxt.distributed.mesh import build_mesh, init_distributed
from neoxt.distributed.parallelize import apply_fsdp, clip_grad_norm_, parallelize
from neoxt.errors import ConfigError
from neoxt.io import write_text_atomic
from neoxt.model import Transformer, flops_per_token, num_params, preset
from neoxt.train.chunked_loss import linear_cross_entropy
from neoxt.train.optim import build_optimizer

SIDES = ("neoxt", "torchtitan")
FLOAT8 = ("off", "tensorwise", "rowwise")
TITAN_FLOAT8 = FLOAT8  # torchtitan 0.2.2's quantize.linear.float8.recipe_name has both recipes
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shape:
    """A model shape and how it is run: tokens per step per device and activation checkpointing."""

    cfg: ModelConfig
    tokens: int
    ac: bool


@dataclass(frozen=True)
class Row:
    side: str
    shape: str
    seq: int
    float8: str

    @property
    def key(self) -> str:
        return f"{self.side}/{self.shape}/{self.seq}/{self.float8}"


def shapes(tiny: bool) -> dict[str, Shape]:
    """TinyLlama-1.1B and LLaMA-2-7B (LLaMA family), Pythia-1B (GPT-NeoX); tiny ones for CPU."""
    if tiny:
        return {
            "llama-tiny": Shape(preset("llama-tiny"), tokens=256, ac=False),
            "gpt-neox-tiny": Shape(preset("gpt-neox-tiny"), tokens=256, ac=False),
        }
    neox_layers, llama_layers = 16, 22
    return {
        "llama-1.1b": Shape(preset(
            "llama-7b", num_layers=llama_layers, hidden_size=2048, num_attention_heads=32, num_kv_heads=4,
            intermediate_size=5632, padded_vocab_size=32000, attention_types=("global",) * llama_layers,
        ), tokens=16384, ac=False),
        "llama-7b": Shape(preset("llama-7b"), tokens=8192, ac=True),
        "gpt-neox-1b": Shape(preset(
            "gpt-neox-7b", num_layers=neox_layers, hidden_size=2048, num_attention_heads=8, num_kv_heads=8,
            intermediate_size=8192, padded_vocab_size=50304, attention_types=("global",) * neox_layers,
        ), tokens=16384, ac=False),
    }


def plan_rows(shape_names: list[str], seqs: list[int], float8s: list[str], peer: bool) -> list[Row]:
    """Every row in priority order: all bf16 rows (by seq, shape; neoxt then torchtitan), then float8."""
    sides = SIDES if peer else SIDES[:1]
    rows = []
    for block in (["off"], [f for f in float8s if f != "off"]):
        if block == ["off"] and "off" not in float8s:
            continue
        for seq in seqs:
            for shape in shape_names:
                for f8 in block:
                    rows += [Row(side, shape, seq, f8) for side in sides
                             if side == "neoxt" or f8 in TITAN_FLOAT8]
    return rows


def select_rows(rows: list[Row], patterns: list[str] | None) -> list[Row]:
    """Rows whose key matches any pattern (fnmatch), in plan order; a pattern matching none is an error."""
    if not patterns:
        return rows
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(r.key, pat) for r in rows):
            raise ConfigError(f"--rows {pat!r} matches no row; rows are side/shape/seq/float8, e.g. "
                              f"{rows[0].key if rows else 'neoxt/llama-7b/2048/off'} (see --list)")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.key, pat) for pat in patterns)]


def estimate_bytes(cfg: ModelConfig, batch: int, seq: int, ac: bool) -> float:
    """Rough peak device memory of one neoxt step (bf16 compute, FSDP2 fp32 master, fused AdamW).

    16 B/param: fp32 param + grad + Adam m, v; activations of a
    LLaMA block ~2 B x (16 H + 5 F) per token (kept for every layer without AC, recomputed one layer
    at a time with AC, which keeps each block's input); 6 GiB for gathered bf16 blocks, the output
    chunk, workspaces and allocator slack."""
    tokens, H, F, L = batch * seq, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    block = tokens * 2 * (16 * H + 5 * F)
    act = tokens * 2 * H * L + block if ac else block * L
    return 16 * num_params(cfg) + act + 6 * 2**30


def fit_layers(cfg: ModelConfig, batch: int, seq: int, ac: bool, device_bytes: float) -> int:
    """The most layers (<= the shape's) whose estimated step fits ``device_bytes``."""
    layers = cfg.num_layers
    while layers > 1 and estimate_bytes(with_layers(cfg, layers), batch, seq, ac) > device_bytes:
        layers -= 1
    return layers


def with_layers(cfg: ModelConfig, layers: int) -> ModelConfig:
    return replace(cfg, num_layers=layers, attention_types=cfg.attention_types[:1] * layers)


def planned(row: Row, shape: Shape, args) -> dict:
    """How a row is run before anything is measured: micro-batch, AC and layers (the shape's)."""
    return {"micro_batch": args.micro_batch or max(1, shape.tokens // row.seq),
            "ac": {"shape": shape.ac, "on": True, "off": False}[args.ac],
            "layers": shape.cfg.num_layers, "of_layers": shape.cfg.num_layers}


def _single_process_group(device: torch.device) -> None:
    """A one-rank group (FSDP2 needs a mesh even on one device)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _free(device: torch.device) -> None:
    """Drop the last row's model: compiled graphs first (they may hold its tensors), then the cache."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_neoxt(mcfg: ModelConfig, row: Row, batch: int, ac: bool, args, device: torch.device) -> dict:
    """Build, warm up (compile) and time one neoxt configuration; returns step time and peak memory."""
    training = TrainingConfig(precision=args.precision, float8_recipe=None if row.float8 == "off" else row.float8)
    par = ParallelismConfig(checkpoint_activations=ac, compile=args.compile)
    cfg = RunConfig(model=mcfg, parallelism=par, training=training)
    mesh = build_mesh(par, dist.get_world_size(), device.type)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(mcfg)
    model = parallelize(model, cfg, mesh)
    if mesh["dp"].size() == 1:  # parallelize shards only over >1 ranks; measure FSDP2's path anyway
        apply_fsdp(model, mesh["dp_shard"], args.precision)
    opt = build_optimizer(model, OptimizerConfig(optimizer_type="adamw", lr=1e-4))
    tokens = torch.randint(0, mcfg.padded_vocab_size, (batch, row.seq + 1), device=device)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones_like(tgt, dtype=torch.bool)

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, tgt, mask) / tgt.numel()

    def step() -> torch.Tensor:
        loss = model(inp, head=head)
        loss.backward()
        clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()  # wait for the device
    dt = (time.perf_counter() - t0) / args.steps
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s": dt, "peak_mem_gib": mem, "loss": float(loss)}


def measure_neoxt(row: Row, shape: Shape, args, device: torch.device) -> dict:
    """One neoxt row: float8 refused in one line where it cannot run; fewer layers if 7B cannot fit."""
    from neoxt.distributed.float8 import check_float8

    out = planned(row, shape, args)
    batch, ac = out["micro_batch"], out["ac"]
    mcfg = replace(shape.cfg, max_position_embeddings=max(shape.cfg.max_position_embeddings, row.seq))
    if row.float8 != "off":
        try:
            check_float8(RunConfig(model=mcfg, training=TrainingConfig(float8_recipe=row.float8)), device)
        except ConfigError as err:
            return {**out, "status": "refused", "note": str(err)}
    notes = []
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        layers = fit_layers(mcfg, batch, row.seq, ac, total)
        if layers < mcfg.num_layers:
            notes.append(f"estimated {estimate_bytes(mcfg, batch, row.seq, ac) / 2**30:.0f} GiB > "
                         f"{total / 2**30:.0f} GiB: measured with {layers} of {mcfg.num_layers} layers")
            mcfg = with_layers(mcfg, layers)
    for attempt in range(2):
        timing = None
        try:
            timing = time_neoxt(mcfg, row, batch, ac, args, device)
        except torch.OutOfMemoryError:
            pass  # freed below, once the exception (whose frames hold the model) is gone
        _free(device)
        if timing is None:
            if attempt or mcfg.num_layers < 4:
                return {**out, "layers": mcfg.num_layers, "status": "oom", "note": "; ".join(notes + ["out of memory"])}
            fewer = mcfg.num_layers * 3 // 4
            notes.append(f"out of memory at {mcfg.num_layers} layers: measured with {fewer} of {out['of_layers']}")
            mcfg = with_layers(mcfg, fewer)
            continue
        break
    return {**out, **timing, "layers": mcfg.num_layers, "status": "ok", "note": "; ".join(notes),
            "flops_per_token": flops_per_token(mcfg, row.seq), "params_b": num_params(mcfg) / 1e9}


def titan_dims(cfg: ModelConfig) -> dict:
    """What ``titan_peer.model_spec`` needs to build torchtitan's LLaMA with this shape."""
    return {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_kv_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.padded_vocab_size, "tied": cfg.tie_word_embeddings, "norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rotary_emb_base}


def measure_titan(row: Row, shape: Shape, layers: int, args, device: torch.device, timeout: float) -> dict:
    """One torchtitan row in its own process (``titan_peer.py``), with neoxt's row's layer count."""
    out = {**planned(row, shape, args), "layers": layers}
    batch, ac = out["micro_batch"], out["ac"]
    mcfg = with_layers(replace(shape.cfg, max_position_embeddings=max(shape.cfg.max_position_embeddings, row.seq)), layers)
    if device.type != "cuda":
        return {**out, "status": "refused", "note": f"the torchtitan peer needs a CUDA GPU; this run is on {device.type}"}
    if shape.cfg.activation != "swiglu" or shape.cfg.norm != "rmsnorm" or shape.cfg.tie_word_embeddings:
        return {**out, "status": "refused", "note": "torchtitan's peer model is LLaMA-3 (untied): LLaMA-shaped rows only"}
    broken = titan_import_error()
    if broken:
        return {**out, "status": "refused", "note": f"torchtitan does not import here: {broken}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(HERE / "titan_peer.py"), "--model-json", json.dumps(titan_dims(mcfg)), "--seq", str(row.seq),
           "--micro-batch", str(batch), "--ac", "on" if ac else "off", "--float8", row.float8,
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += [] if args.compile else ["--no-compile"]
    _free(device)
    code, stdout, stderr = run_group(cmd, timeout)
    _log_peer(args, row, cmd, stdout + stderr, "timed out" if code is None else f"exit {code}")
    if code is None:
        return {**out, "status": "failed", "note": f"torchtitan row timed out after {timeout:.0f}s"}
    result = [line for line in stdout.splitlines() if line.startswith("TITAN_RESULT ")]
    if code != 0 or not result:
        oom = "OutOfMemoryError" in stderr or "CUDA out of memory" in stderr
        return {**out, "status": "oom" if oom else "failed", "note": f"torchtitan exit {code}: {error_line(stderr + stdout)}"}
    got = json.loads(result[-1][len("TITAN_RESULT "):])
    if got["titan_params"] != num_params(mcfg):  # the two sides must have run the same shape
        return {**out, **got, "status": "failed",
                "note": f"torchtitan built {got['titan_params']:,} params, neoxt's shape has {num_params(mcfg):,}"}
    return {**out, **got, "status": "ok", "note": "", "flops_per_token": flops_per_token(mcfg, row.seq),
            "params_b": num_params(mcfg) / 1e9}


_TITAN_IMPORT: list[str] = []


def titan_import_error() -> str:
    """'' when torchtitan's trainer and LLaMA model import in a fresh interpreter, else the error line;
    checked once per run, so a torchtitan that cannot load here costs seconds, not a failure per row."""
    if not _TITAN_IMPORT:
        code, out, err = run_group([sys.executable, "-c", "import torchtitan.train, torchtitan.models.llama3"], 300)
        _TITAN_IMPORT.append("" if code == 0 else error_line(err + out))
    return _TITAN_IMPORT[0]


def run_group(cmd: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun and its worker,
    which would otherwise keep the GPU) and return ``None`` as the exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _PEERS.append(proc.pid)
    deadline = time.monotonic() + timeout
    try:
        while True:  # in 1 s slices, so a SIGTERM handler gets to run (Python runs them between bytecodes)
            try:
                stdout, stderr = proc.communicate(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                return proc.returncode, stdout, stderr
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    break
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr
    finally:
        _PEERS.remove(proc.pid)


_PEERS: list[int] = []  # process groups of running peers, killed if this process is told to stop


def _stop(signum: int, frame) -> None:
    """SIGTERM (e.g. from ``timeout``): end the running peer too; its own session would outlive us."""
    for pid in list(_PEERS):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


_LAUNCHER_NOISE = ("ChildFailedError", "elastic/errors.html", "error_file", "exitcode", "Root Cause", "Failures:")


def error_line(text: str) -> str:
    """The most telling line of a failed peer's output: its last ``...Error: ...`` / ``...Exception``
    line that is not torchrun's own summary, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("=")]
    errors = [ln for ln in lines if ("Error" in ln or "Exception" in ln) and not any(n in ln for n in _LAUNCHER_NOISE)]
    return ((errors or lines or ["no output"])[-1])[:300]


def _log_peer(args, row: Row, cmd: list[str], text: str, how: str) -> None:
    """Append the peer's whole output to ``--peer-log`` (its own logs are long; the table stays short)."""
    if args.peer_log:
        with open(args.peer_log, "a", encoding="utf-8") as f:
            f.write(f"\n===== {row.key} ({how}) =====\n$ {' '.join(cmd)}\n{text}\n")


def finish(row: Row, result: dict, args, world: int, wall: float) -> dict:
    """Add tokens/s, TFLOP/s and MFU (neoxt's FLOP count for both sides) to a measured row."""
    r = {**asdict(row), "key": row.key, "wall_s": wall, **result}
    if r["status"] == "ok":
        tokens = r["micro_batch"] * row.seq
        r["tokens_per_s"] = tokens * world / r["step_s"]
        r["tflops_per_device"] = r["flops_per_token"] * tokens / r["step_s"] / 1e12
        r["mfu"] = r["tflops_per_device"] / args.peak_tflops if args.peak_tflops else None
    return r


def _num(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _cell(r: dict | None) -> list[str]:
    if r is None:
        return ["—", "", "", ""]
    if r["status"] != "ok":
        return [{"refused": "refused", "oom": "OOM", "failed": "failed", "skipped": "not run"}[r["status"]], "", "", ""]
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "n/a"
    return [f"{r['tokens_per_s']:,.0f}", _num(r["tflops_per_device"]), mfu, mem]


def markdown(results: list[dict]) -> str:
    """REPORT.md section 4's table: one line per shape x seq x float8, neoxt and torchtitan side by side."""
    head = ("| shape | layers | seq | micro-batch | AC | float8 | neoxt tokens/s | TFLOP/s | MFU | peak GiB "
            "| torchtitan tokens/s | TFLOP/s | MFU | peak GiB | neoxt / torchtitan |")
    lines = [head, "|" + "---|" * 15]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["shape"], r["seq"], r["float8"]), {})[r["side"]] = r
    notes = []
    for (shape, seq, f8), sides in groups.items():
        ours, peer = sides.get("neoxt"), sides.get("torchtitan")
        first = ours or peer
        ratio = (f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if ours and peer and
                 ours["status"] == peer["status"] == "ok" else "")
        layers = f"{first['layers']}/{first['of_layers']}" if first["layers"] != first["of_layers"] else str(first["layers"])
        ac = "on" if first["ac"] else "off"
        lines.append("| " + " | ".join([shape, layers, str(seq), str(first["micro_batch"]), ac, f8,
                                         *_cell(ours), *_cell(peer), ratio]) + " |")
        notes += [f"- {r['key']}: {r['note']}" for r in (ours, peer) if r and r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def progress_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['key']:<34} {r['status']}: {r['note']}"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "n/a"
    return (f"{r['key']:<34} L={r['layers']} mb={r['micro_batch']} AC={'on' if r['ac'] else 'off'}  "
            f"{r['tokens_per_s']:>10,.0f} tok/s  {r['tflops_per_device']:7.2f} TFLOP/s  MFU {mfu}  mem {mem}  "
            f"({r['wall_s']:.0f}s)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, seq 64/128, fp32 — a CPU smoke run")
    p.add_argument("--shapes", nargs="+", default=None, help="default llama-1.1b llama-7b (tiny: llama-tiny)")
    p.add_argument("--seqs", nargs="+", type=int, default=None, help="default 2048 8192 (tiny: 64 128)")
    p.add_argument("--float8", nargs="+", choices=FLOAT8, default=list(FLOAT8), help="float8 settings to run")
    p.add_argument("--peer", choices=("none", "torchtitan"), default="none", help="also run torchtitan's rows")
    p.add_argument("--rows", nargs="+", default=None, help="only rows whose key matches (fnmatch, e.g. '*/llama-7b/*/off')")
    p.add_argument("--list", action="store_true", help="print the selected row keys and exit")
    p.add_argument("--micro-batch", type=int, default=None, help="override the shape's tokens-per-step rule")
    p.add_argument("--ac", choices=("shape", "on", "off"), default="shape", help="activation checkpointing (default: the shape's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 (fp32 with --tiny)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (default 989 on CUDA)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting rows that would end past this many seconds")
    p.add_argument("--row-guess-s", type=float, default=90.0, help="time budgeted for a row of a side/shape not yet timed")
    p.add_argument("--row-timeout-s", type=float, default=300.0, help="longest a torchtitan row may run")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after every row)")
    p.add_argument("--markdown", default=None, help="write the REPORT.md table here at the end")
    p.add_argument("--peer-log", default=None, help="append torchtitan's full output here")
    args = p.parse_args(argv)
    args.shapes = args.shapes or (["llama-tiny"] if args.tiny else ["llama-1.1b", "llama-7b"])
    args.seqs = args.seqs or ([64, 128] if args.tiny else [2048, 8192])
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    return args


def over_budget(row: Row, done: list[dict], left: float, guess: float) -> str | None:
    """Why ``row`` is not started with ``left`` seconds of the budget, or None when it fits: a row is
    expected to take as long as the longest finished row of its side and shape, else ``guess``."""
    same = [r["wall_s"] for r in done if r["side"] == row.side and r["shape"] == row.shape and r["status"] == "ok"]
    need = max(same) if same else guess
    return None if left >= need else f"not run: {max(left, 0):.0f}s of the time budget left, a row takes ~{need:.0f}s"


def run_rows(rows: list[Row], table: dict[str, Shape], args, device: torch.device) -> list[dict]:
    world, start, results = dist.get_world_size(), time.monotonic(), []
    layers_used: dict[tuple, int] = {}
    for row in rows:
        left = args.budget_s - (time.monotonic() - start) if args.budget_s else math.inf
        skip = over_budget(row, results, left, args.row_guess_s)
        t0 = time.monotonic()
        if skip:
            result = {**planned(row, table[row.shape], args), "status": "skipped", "note": skip}
        elif row.side == "neoxt":
            try:
                result = measure_neoxt(row, table[row.shape], args, device)
            except Exception as err:  # one broken row must not lose the table; the traceback goes to stderr
                traceback.print_exc()
                _free(device)
                result = {**planned(row, table[row.shape], args), "status": "failed",
                          "note": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            if result["status"] == "ok":
                layers_used[(row.shape, row.seq, row.float8)] = result["layers"]
        else:
            layers = layers_used.get((row.shape, row.seq, row.float8), table[row.shape].cfg.num_layers)
            result = measure_titan(row, table[row.shape], layers, args, device, min(args.row_timeout_s, max(left, 1)))
        results.append(finish(row, result, args, world, time.monotonic() - t0))
        print(progress_line(results[-1]), flush=True)
        if args.json:
            write_text_atomic(args.json, json.dumps(report_json(results, args, device), indent=2) + "\n")
    return results


def report_json(results: list[dict], args, device: torch.device) -> dict:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "precision": args.precision, "peak_tflops": args.peak_tflops,
            "compile": args.compile, "warmup": args.warmup, "steps": args.steps, "rows": results}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    table = shapes(args.tiny)
    unknown = [s for s in args.shapes if s not in table]
    try:
        if unknown:
            raise ConfigError(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(table)}")
        rows = select_rows(plan_rows(args.shapes, args.seqs, args.float8, args.peer == "torchtitan"), args.rows)
    except ConfigError as err:
        print(f"mfu.py: {err}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(r.key for r in rows))
        return 0
    signal.signal(signal.SIGTERM, _stop)
    env = init_distributed()
    device = env.device
    _single_process_group(device)
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 989.0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = run_rows(rows, table, args, device)
    text = markdown(results)
    if dist.get_rank() == 0:
        print("\n" + text, flush=True)
        if args.markdown:
            write_text_atomic(args.markdown, text + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
