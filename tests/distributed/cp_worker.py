"""Runs under ``torchrun --nproc_per_node N`` (gloo, CPU): one forward + backward of the LM loss with
the sequence split over context-parallel ranks, beside the same step on the whole sequence in one
process (every rank computes that reference itself, from the same seed, without collectives).

Writes OUT.json on rank 0: per scenario, the CP loss, the reference loss and the largest absolute
difference of any parameter gradient.

Usage: python cp_worker.py OUT.json SCENARIO [SCENARIO ...]
Scenario: "<arch>:<mask>:<layout>" with arch llama (GQA, causal: the ring) or olmo3 (sliding-window
and full layers: all-gathered K/V for the windowed ones), mask "causal" or "docs" (a document mask
from reset_attention_mask, plus restarting position ids), layout "cp" (all ranks on cp), "cpac" (the same
with activation checkpointing: the ring runs again in the recompute), "cptp" (cp=2 x tp=2, four
ranks), "dpcp" (dp=2 x cp=2, four ranks: each data-parallel rank takes its rows of the batch) or
"cpcompile" (torch.compile per block).
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist

from neoxt.config.schema import ParallelismConfig, RunConfig
from neoxt.model import Transformer, preset
from neoxt.train.objectives.base import loss_chunk_size, token_loss_sum
from neoxt.train.objectives.lm import counted_tokens

BATCH, SEQ, VOCAB = 2, 32, 128
EOD = 0


def model_cfg(arch: str):
    over = {"num_layers": 4, "padded_vocab_size": VOCAB, "hidden_dropout": 0.0, "attention_dropout": 0.0,
            "no_weight_tying": True}
    cfg = preset({"llama": "llama-tiny", "olmo3": "olmo3-tiny"}[arch], **over)
    kinds = ("sliding", "sliding", "sliding", "global") if arch == "olmo3" else ("global",) * 4
    return replace(cfg, attention_types=kinds, sliding_window_width=5 if arch == "olmo3" else cfg.sliding_window_width)


def batch(mask: str) -> dict[str, torch.Tensor]:
    """A fixed global micro-batch; with ``docs``, EOD tokens split it into documents (GPT-NeoX's
    reset_attention_mask / reset_position_ids) and the loss skips a few positions (loss_mask)."""
    from neoxt.data.loader import Batch

    g = torch.Generator().manual_seed(0)
    data = torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=g)
    out = {"tokens": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()}
    if mask == "docs":
        data[0, [5, 17, 18]] = EOD
        data[1, [11]] = EOD
        tokens = data[:, :-1].contiguous()
        doc = torch.cumsum((tokens == EOD).long(), dim=1) - (tokens == EOD).long()
        starts = torch.zeros_like(tokens)
        for b in range(BATCH):
            for t in range(1, SEQ):
                starts[b, t] = t if doc[b, t] != doc[b, t - 1] else starts[b, t - 1]
        loss_mask = torch.ones(BATCH, SEQ)
        loss_mask[:, 3] = 0
        b = Batch(tokens=tokens, labels=data[:, 1:].contiguous(), loss_mask=loss_mask,
                  position_ids=torch.arange(SEQ)[None] - starts, document_ids=doc)
        out = {"tokens": b.tokens, "labels": b.labels, "loss_mask": b.loss_mask, "position_ids": b.position_ids,
               "attention_mask": b.attention_mask()}
    return out


def reference(arch: str, b: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1234)
    model = Transformer(model_cfg(arch))
    loss = token_loss_sum(model, b, "fp32") / counted_tokens([b])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def run(name: str) -> dict:
    from neoxt.distributed.context_parallel import sequence_split, shard_batch
    from neoxt.distributed.mesh import build_mesh, dp_group
    from neoxt.distributed.parallelize import parallelize
    from neoxt.train.objectives.lm import accumulate_gradients

    arch, mask, layout = name.split(":")
    world = dist.get_world_size()
    tp = 2 if layout == "cptp" else 1
    dp = 2 if layout == "dpcp" else 1
    par = ParallelismConfig(context_parallel_size=world // (tp * dp), model_parallel_size=tp,
                            checkpoint_activations=layout == "cpac", compile=layout == "cpcompile")
    cfg = RunConfig(model=model_cfg(arch), parallelism=par)
    mesh = build_mesh(par)
    b = batch(mask)
    ref_loss, ref_grads = reference(arch, b)
    torch.manual_seed(1234)
    model = parallelize(Transformer(model_cfg(arch)), cfg, mesh)
    if dp > 1:  # each data-parallel rank reads its rows of the global batch, then splits their sequences
        rank = mesh["dp"].get_local_rank()
        b = {k: v[rank * BATCH // dp:(rank + 1) * BATCH // dp] for k, v in b.items()}
    local = shard_batch(b, sequence_split(mesh))
    loss = accumulate_gradients(model, [local], "fp32", group=dp_group(mesh),
                                chunk=loss_chunk_size(replace(cfg, training=replace(cfg.training, loss_chunk_size=8))))
    diff = 0.0
    for n, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        diff = max(diff, (grad - ref_grads[n]).abs().max().item())
    return {"loss": float(loss), "ref_loss": ref_loss, "grad_diff": diff,
            "local_tokens": int(local["tokens"].shape[1])}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    results: dict = {}
    for name in names:
        try:
            results[name] = run(name)
        except Exception:  # noqa: BLE001 - reported to the test, which fails naming the scenario
            results[name] = {"error": traceback.format_exc()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
