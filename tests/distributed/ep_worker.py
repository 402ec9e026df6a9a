"""Runs under ``torchrun --nproc_per_node 2``: an MoE model with expert parallelism 2 (experts split
over the ranks, tokens exchanged all-to-all, FSDP2 over the rest) against the same model on one
process, same weights, same global batch. Rank 0 writes JSON: the largest gradient difference and
how many experts each rank holds.

Usage: python ep_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from neoxt.config.schema import ParallelismConfig, RunConfig
from neoxt.distributed.mesh import build_mesh, init_distributed
from neoxt.distributed.parallelize import build_parallel_model, parallelize
from neoxt.model import Transformer, preset
from neoxt.train.losses import lm_loss_sum


def _loss(model, tokens, labels, total_tokens: int, shares: int) -> torch.Tensor:
    s, _ = lm_loss_sum(model(tokens), labels)
    return s / total_tokens + model.aux_loss() / shares


def main(out: str) -> None:
    init_distributed()
    rank = dist.get_rank()
    cfg = preset("llama-tiny", moe_num_experts=4, moe_top_k=2, moe_router_type="topk", moe_norm_topk_prob=True,
                 moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01, padded_vocab_size=128)
    run = RunConfig(model=cfg, parallelism=ParallelismConfig(moe_expert_parallel_size=2))
    torch.manual_seed(0)
    ref = Transformer(cfg)
    torch.manual_seed(0)
    model = parallelize(Transformer(cfg), run, build_mesh(run.parallelism))
    data = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(1))
    tokens, labels = data[:, :-1], data[:, 1:]
    mine = slice(2 * rank, 2 * rank + 2)
    _loss(model, tokens[mine], labels[mine], labels.numel(), 2).backward()
    for i in range(2):  # the same two halves as two micro-batches on one process
        half = slice(2 * i, 2 * i + 2)
        _loss(ref, tokens[half], labels[half], labels.numel(), 2).backward()
    diff = 0.0
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        diff = max(diff, (grad - ref_grads[name].grad).abs().max().item())
    up = model.layers[0].mlp.experts.up
    # Built on the meta device and initialised shard by shard (large models): trains too.
    meta_built = build_parallel_model(run, build_mesh(run.parallelism), "cpu")
    meta_loss = _loss(meta_built, tokens[mine], labels[mine], labels.numel(), 2)
    meta_loss.backward()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"max_grad_diff": diff, "local_experts": up.to_local().shape[0],
                       "global_experts": up.shape[0], "ep_group": model.layers[0].mlp.experts.ep_group is not None,
                       "meta_loss": meta_loss.item()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
