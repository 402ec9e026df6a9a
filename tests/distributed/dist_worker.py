"""Runs under ``torchrun --nproc_per_node 2`` (or as a plain single process for the reference).

Trains tiny models for a few steps on a fixed global batch under several parallel layouts and writes
one JSON file of per-step losses (rank 0). Every layout sees the same global batch and starts from
the same weights (same seed), so its loss curve must equal the single-process one.

Usage: python dist_worker.py OUT.json SCENARIO [SCENARIO ...]
Scenario names: "<layout>:<arch>" with layout in tp, sp, fsdp, hsdp, pp1f1b, ppgpipe, ppint, ppchunk and
arch in neox, llama, olmo3, moe (LLaMA with 4 experts + a shared one).
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from neoxt.config.schema import ParallelismConfig, RunConfig, TrainingConfig
from neoxt.distributed.parallelize import build_parallel_model, clip_grad_norm_
from neoxt.model import Transformer, preset

STEPS = 4
BATCH, SEQ = 4, 16
LR = 1e-2
CLIP = 0.5  # active from the first step: a wrong global gradient norm changes the curve
GRAD_NORMS: list[float] = []  # pre-clipping global norms seen by dp_step, in order
PRESETS = {"neox": "gpt-neox-tiny", "llama": "llama-tiny", "olmo3": "olmo3-tiny", "moe": "llama-tiny"}
# "moe": LLaMA with every MLP a mixture of 4 experts (top-2) plus one shared expert.
MOE = {"moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk", "moe_norm_topk_prob": True,
       "moe_num_shared_experts": 1, "moe_intermediate_size": 32}


def model_cfg(arch: str, **over):
    # Untied heads (vocab-parallel head under TP, and required by PP); 4 layers for the 2x2 interleaved split.
    base = {"no_weight_tying": True, "num_layers": 4, "padded_vocab_size": 128, "hidden_dropout": 0.0,
            "attention_dropout": 0.0}
    cfg = preset(PRESETS[arch], **{**base, **(MOE if arch == "moe" else {}), **over})
    if len(cfg.attention_types) != cfg.num_layers:
        kinds = ("sliding", "sliding", "sliding", "global") if arch == "olmo3" else ("global",) * 4
        cfg = replace(cfg, attention_types=kinds[: cfg.num_layers])
    return cfg


def batch(vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def build(arch: str, **over) -> Transformer:
    """Same weights on every rank and in the reference (fixed seed before construction)."""
    torch.manual_seed(1234)
    return Transformer(model_cfg(arch, **over))


def run_config(arch: str, par: ParallelismConfig, precision: str = "fp32", **over) -> RunConfig:
    return RunConfig(model=model_cfg(arch, **over), parallelism=par, training=TrainingConfig(precision=precision))


def make_opt(params, kind: str) -> torch.optim.Optimizer:
    """AdamW as the trainer uses; SGD where a wrong gradient *scale* must show (Adam hides it)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.3)
    return torch.optim.AdamW(params, lr=LR)


def opt_kind(layout: str) -> str:
    return "sgd" if layout in ("fsdp", "hsdp", "fsdptp", "hsdptp", "fsdpbf16", "fsdpcompile") else "adamw"


def train_plain(model: torch.nn.Module, steps: int = STEPS, opt: str = "adamw") -> list[float]:
    """The reference: one process, whole batch."""
    tokens, labels = batch()
    opt = make_opt(model.parameters(), opt)
    losses = []
    for _ in range(steps):
        loss = ce(model(tokens), labels)
        loss.backward()
        GRAD_NORMS.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def dp_step(model, opt, tok, lab, dp_size: int) -> float:
    """One step in neoxt's convention (token-loss sum over the global token count; FSDP sums)."""
    logits = model(tok)
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), lab.reshape(-1), reduction="sum"
    )
    (loss_sum / (lab.numel() * dp_size)).backward()
    GRAD_NORMS.append(float(clip_grad_norm_(model.parameters(), CLIP)))
    opt.step()
    opt.zero_grad()
    report = loss_sum.detach() / (lab.numel() * dp_size)
    if dist.is_initialized():
        dist.all_reduce(report)
    return report.item()


def full_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optimizer": osd}


def load_full_state(path, model, opt) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from neoxt.checkpoint import load_state

    state = load_state(path, full_state(model, opt))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def run_checkpoint_scenario(layout: str, arch: str) -> dict[str, list[float]]:
    """2 ranks (``ckpt``: FSDP, ``ckpttp``: TP): resume the 1-process checkpoint
    ``<dir>/one-<arch>`` and save their own as ``<dir>/<layout>-<arch>``."""
    import os

    from neoxt.checkpoint import save_checkpoint
    from neoxt.distributed.mesh import build_mesh, dp_rank_size
    from neoxt.distributed.parallelize import parallelize

    root = os.environ["NEOXT_TEST_CKPT_DIR"]
    par = ParallelismConfig(model_parallel_size=2 if layout == "ckpttp" else 1)
    mesh = build_mesh(par, dist.get_world_size())
    dp_rank, dp_size = dp_rank_size(mesh)
    tokens, labels = batch()
    per = BATCH // dp_size
    tok, lab = tokens[dp_rank * per : (dp_rank + 1) * per], labels[dp_rank * per : (dp_rank + 1) * per]
    scale = dp_size / dist.get_world_size()  # dp_step's report sums over all ranks
    out: dict[str, list[float]] = {}

    model = parallelize(build(arch), run_config(arch, par), mesh)
    opt = make_opt(model.parameters(), "adamw")
    load_full_state(f"{root}/one-{arch}/global_step2", model, opt)
    out["resumed_from_one"] = [dp_step(model, opt, tok, lab, dp_size) * scale for _ in range(2)]

    model = parallelize(build(arch), run_config(arch, par), mesh)
    opt = make_opt(model.parameters(), "adamw")
    out["two"] = [dp_step(model, opt, tok, lab, dp_size) * scale for _ in range(2)]
    save_checkpoint(f"{root}/{layout}-{arch}", 2, full_state(model, opt), "{}\n")
    out["two"] += [dp_step(model, opt, tok, lab, dp_size) * scale for _ in range(2)]
    return out


def chunked_mean_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``ce`` of ``hidden @ weight.T`` without the logits: the pipeline's ``head_loss``, 5 tokens a chunk."""
    from neoxt.train.chunked_loss import linear_cross_entropy

    mask = labels >= 0
    return linear_cross_entropy(hidden, weight, labels, mask, chunk=5) / mask.sum()


def run_pipeline_scenario(layout: str, arch: str) -> list[float]:
    """pp1f1b / ppgpipe / ppint (2 processes), ppfsdp / pptp (4: 2 stages x FSDP or TP over 2): the loss
    from the hidden states in chunks (``head_loss``), except under TP (full logits, ``lm_loss``)."""
    from neoxt.distributed.mesh import build_mesh, dp_group, dp_rank_size
    from neoxt.distributed.pipeline import build_pipeline

    world = dist.get_world_size()
    tokens, labels = batch()
    sched = {"pp1f1b": "1f1b", "ppgpipe": "gpipe", "ppint": "interleaved_1f1b", "ppfsdp": "1f1b",
             "pptp": "interleaved_1f1b"}[layout]
    pp = 2 if layout in ("ppfsdp", "pptp") else world
    par = ParallelismConfig(pipe_parallel_size=pp, pipeline_schedule=sched,
                            model_parallel_size=2 if layout == "pptp" else 1)
    cfg = run_config(arch, par)
    mesh = build_mesh(par, world)
    dp_rank, dp_size = dp_rank_size(mesh)
    per = BATCH // dp_size
    tok, lab = tokens[dp_rank * per : (dp_rank + 1) * per], labels[dp_rank * per : (dp_rank + 1) * per]
    pipe = build_pipeline(build(arch), cfg, mesh, n_microbatches=per if dp_size > 1 else 4,
                          head_loss=None if layout == "pptp" else chunked_mean_ce)
    opt = torch.optim.AdamW(list(pipe.parameters()), lr=LR)
    group = dp_group(mesh)

    def step(train: bool) -> float:
        loss = pipe.step(tok if pipe.has_first else None, lab if pipe.has_last else None, train=train)
        if group is not None:
            dist.all_reduce(loss, group=group)
            loss = loss / dp_size
        return loss.item()

    losses = []
    for _ in range(STEPS):
        loss = step(train=True)
        GRAD_NORMS.append(float(clip_grad_norm_(list(pipe.parameters()), CLIP, pp_mesh=mesh["pp"])))
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    # Forward-only pass after training: equals the reference's loss before a 5th update.
    return losses + [step(train=False)]


def run_pipeline_chunk_scenario(layout: str, arch: str) -> dict:
    """"ppchunk" (1f1b) / "ppchunkint" (interleaved, 2 stages a rank): the objective's pipeline loss
    (``PipelineLoss``: token-loss sum x factor, z-loss, ignored labels, micro-batches counting
    different tokens) from full logits (loss_chunk_size 0) and from the hidden states 5 tokens at a
    time, 4 SGD steps and a forward-only one each. Per run: losses, pre-clipping gradient norms and
    ``vocab_rows``, the most rows of any [..., vocab] tensor the last stage's rank computed."""
    from neoxt.distributed.mesh import build_mesh
    from neoxt.distributed.pipeline import build_pipeline
    from neoxt.train.objectives.pipeline import PipelineLoss

    par = ParallelismConfig(pipe_parallel_size=dist.get_world_size(),
                            pipeline_schedule="interleaved_1f1b" if layout.endswith("int") else "1f1b")
    mesh = build_mesh(par, dist.get_world_size())
    vocab = 100  # no other activation of these models is 100 wide (llama's fused q/k/v is 128)
    tokens, labels = batch(vocab)
    labels[0, :5] = labels[2, 3:] = -100
    n_micro = 4
    out = {}
    for chunk in (0, 5):
        loss_fn = PipelineLoss(z_loss=1e-3, factor=n_micro / float((labels >= 0).sum()), chunk=chunk)
        pipe = build_pipeline(build(arch, padded_vocab_size=vocab), run_config(arch, par, padded_vocab_size=vocab),
                              mesh, n_microbatches=n_micro, loss_fn=loss_fn,
                              head_loss=loss_fn.from_hidden if chunk else None)
        opt = make_opt(list(pipe.parameters()), "sgd")
        spy = VocabRows(vocab)
        losses, norms = [], []
        for train in (True,) * STEPS + (False,):
            with spy if pipe.has_last else contextlib.nullcontext():
                losses.append(pipe.step(tokens if pipe.has_first else None, labels if pipe.has_last else None,
                                        train=train).item())
            if train:
                norms.append(float(clip_grad_norm_(list(pipe.parameters()), CLIP, pp_mesh=mesh["pp"])))
                opt.step()
                opt.zero_grad()
        rows = torch.tensor(spy.rows)
        dist.all_reduce(rows, op=dist.ReduceOp.MAX)
        out[f"chunk{chunk}"] = {"losses": losses, "grad_norms": norms, "vocab_rows": int(rows)}
    return out


class VocabRows(TorchDispatchMode):
    """Records the most rows (elements / vocab) of any floating tensor with a last dimension of
    ``vocab`` that an op computes (views excluded: ``weight.t()`` is [H, vocab] but no logits)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[-1] == self.vocab:
                    self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def run_scenario(name: str) -> list[float] | dict:
    from neoxt.distributed.mesh import build_mesh, dp_rank_size
    from neoxt.distributed.parallelize import parallelize

    layout, arch = name.split(":")
    if layout.startswith("ckpt"):
        return run_checkpoint_scenario(layout, arch)
    over = {}
    if layout.endswith("tied"):  # tied embeddings: replicated over tp, head is F.linear(x, embed.weight)
        layout, over = layout[: -len("tied")], {"no_weight_tying": False}
    if layout.startswith("ppchunk"):
        return run_pipeline_chunk_scenario(layout, arch)
    if layout.startswith("pp"):
        return run_pipeline_scenario(layout, arch)
    world = dist.get_world_size()
    tokens, labels = batch()
    par = {
        "tp": ParallelismConfig(model_parallel_size=world),
        "sp": ParallelismConfig(model_parallel_size=world, sequence_parallel=True),
        "fsdp": ParallelismConfig(),
        "hsdp": ParallelismConfig(data_parallel_replicate=world),
        "fsdpbf16": ParallelismConfig(),
        "meta": ParallelismConfig(model_parallel_size=world),
        "tpcompile": ParallelismConfig(model_parallel_size=world, compile=True),
        "spcompile": ParallelismConfig(model_parallel_size=world, compile=True, sequence_parallel=True),
        "tpcompileac": ParallelismConfig(model_parallel_size=world, compile=True, checkpoint_activations=True),
        "tpcompilesel": ParallelismConfig(model_parallel_size=world, compile=True, checkpoint_activations=True,
                                          activation_checkpointing_mode="selective"),
        "fsdpcompile": ParallelismConfig(compile=True, checkpoint_activations=True,
                                         activation_checkpointing_mode="selective"),
        "tpac": ParallelismConfig(model_parallel_size=world, checkpoint_activations=True),
        # 4 processes: FSDP over 2 x TP over 2 (the usual multi-node layout), with sequence parallel.
        "fsdptp": ParallelismConfig(model_parallel_size=2, sequence_parallel=True),
        "hsdptp": ParallelismConfig(model_parallel_size=2, data_parallel_replicate=2),
    }[layout]
    mesh = build_mesh(par, world)
    precision = "bf16" if layout.endswith("bf16") else "fp32"
    if layout == "meta":  # meta-device build: compared on its own terms (different init draws)
        torch.manual_seed(1234)
        model = build_parallel_model(run_config(arch, par), mesh, "cpu")
    else:
        model = parallelize(build(arch, **over), run_config(arch, par, precision, **over), mesh)
    if precision == "bf16":  # FSDP2 mixed precision: fp32 sharded master weights, bf16 compute
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():
            assert model(tokens[:1]).dtype == torch.bfloat16
    dp_rank, dp_size = dp_rank_size(mesh)
    per = BATCH // dp_size
    tok, lab = tokens[dp_rank * per : (dp_rank + 1) * per], labels[dp_rank * per : (dp_rank + 1) * per]
    opt = make_opt(model.parameters(), opt_kind(layout))
    # TP ranks of one dp rank report the same loss: average over all ranks to get the global mean.
    return [dp_step(model, opt, tok, lab, dp_size) * dp_size / world for _ in range(STEPS)]


def main() -> None:
    out, scenarios = sys.argv[1], sys.argv[2:]
    from neoxt.distributed.mesh import init_distributed

    init_distributed()
    results: dict[str, object] = {}
    for name in scenarios:
        try:
            GRAD_NORMS.clear()
            got = run_scenario(name)
            results[name] = got if isinstance(got, dict) else {"losses": got, "grad_norms": list(GRAD_NORMS)}
        except Exception:  # noqa: BLE001 - report per scenario so one failure does not hide the rest
            results[name] = {"error": traceback.format_exc()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
