"""Mixture-of-experts MLP: a router sends each token to ``moe_top_k`` of ``moe_num_experts`` MLPs.

One MoE sublayer, read top to bottom:

1. **Router.** ``router.weight`` [E, H] gives logits [N, E] (fp32) for the N tokens of the batch;
   scores are their softmax (Mixtral, OLMoE, Qwen3-MoE) or sigmoid (DeepSeek-V3 style).
2. **Choice.** The top-k scores per token (``moe_router_type: topk``), or while training under
   upstream GPT-NeoX's default ``sinkhorn`` the top-k of Sinkhorn-balanced scores (a few scaling
   iterations that push every expert towards an equal share; weights stay the raw scores, which for
   a GPT-NeoX sinkhorn top-1 config are sigmoids, as upstream's router weighs them: see
   ``config/load.py``). With ``moe_norm_topk_prob`` the k weights are rescaled to sum to one.
3. **Capacity.** Dropless by default. With ``moe_token_dropping`` each expert takes at most
   ``max(moe_min_capacity, ceil(factor * N * k / E))`` assignments, first choices before second
   ones, earlier tokens first (GShard's order); a dropped assignment contributes nothing (the
   residual stream carries the token on).
4. **Experts.** Assignments are sorted by expert and run as one grouped GEMM per projection
   (torch's ``grouped_mm``: CUDA bf16 on SM80+, and CPU) or a loop over experts elsewhere (the
   reference the tests compare it with); expert weights are stacked
   ``experts.{gate,up,down}`` [E, F, H] / [E, H, F] (HF's per-expert ``gate_proj``/``up_proj``/
   ``down_proj`` stacked). Outputs are scaled by their routing weight and summed per token, plus
   the shared experts' dense MLP when ``moe_num_shared_experts`` > 0. Experts and shared experts
   have no biases whatever ``use_bias_in_mlp`` says (as upstream GPT-NeoX's MoE).
5. **Auxiliary losses**, recorded on each training forward (``MoE.aux``) and read by
   ``moe_aux_losses(model)``: the load-balancing loss ``E * sum_e f_e * P_e`` (f: fraction of the
   top-k assignments that went to expert e, P: mean normalised score of e; 1.0 when perfectly
   balanced, HF's and Switch's formula) and the router z-loss ``mean(logsumexp(logits)^2)``. The
   trainer adds ``moe_aux_loss_coeff`` x and ``moe_z_loss_coeff`` x their means over MoE layers.

Tensor parallelism (``model_parallel_size``): each expert's hidden width F is split over the
``tp`` ranks (``gate``/``up`` on their F dim, ``down`` on its), as a dense MLP's is, and the shared
experts are a dense MLP under the usual plan. The router and routing run whole on every rank (same
input, same choice); the experts' partial outputs are all-reduced per assignment, before the routing
weights multiply in, so every downstream gradient, the router's included, is whole on every rank.

Expert parallelism (``moe_expert_parallel_size``, see ``neoxt.distributed.parallelize``): the
stacked expert weights become DTensors sharded on dim 0 over the ``ep`` mesh dim and
``Experts.ep_group`` is set; each rank routes its own tokens, sends every assignment to the rank
that owns its expert with one all-to-all, computes, and sends results back with another. Routing,
capacity and the losses are per rank and unchanged, so EP changes where experts run, not the math.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from neoxt.config.schema import ModelConfig
from neoxt.errors import ConfigError

Activation = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, iters: int = 3, tol: float = 1e-4) -> torch.Tensor:
    """Scores [N, E] rescaled towards equal row and column mass (upstream GPT-NeoX's balancing)."""
    cost = (logits.float() - logits.float().max()).exp()  # shifting all logits leaves the result unchanged
    n, e = cost.shape
    eps = 1e-8
    d0 = torch.ones(n, device=cost.device)
    d1 = 1.0 / (e * cost.sum(0) + eps)
    for _ in range(iters):
        d0 = (1.0 / n) / (cost @ d1 + eps)
        new = (1.0 / e) / (d0 @ cost + eps)
        done = (new - d1).abs().mean() < tol
        d1 = new
        if done:
            break
    return d1 * cost * d0[:, None]


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    return torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, dim=-1)


def load_balancing_loss(scores: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` over one batch (scores [N, E] fp32, chosen [N, k]); 1.0 when balanced."""
    probs = scores / scores.sum(-1, keepdim=True)
    counts = torch.zeros(num_experts, device=scores.device).index_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), device=scores.device)
    )
    f = counts / (chosen.shape[0] * chosen.shape[1])
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean()


def capacity_mask(chosen: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Bool [N, k]: which assignments fit their expert's capacity (k-th choices after (k-1)-th, then token order)."""
    by_slot = chosen.t().reshape(-1)  # slot-major: every first choice before any second choice
    one_hot = F.one_hot(by_slot, num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # 0-based arrival index within its expert
    return (position < capacity).reshape(chosen.shape[1], chosen.shape[0]).t()


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def _tp_rows(x: torch.Tensor, mesh) -> torch.Tensor:
    """Tensor parallel input: every rank holds all rows, and its gradient for them covers only its
    share of F, so the gradients are summed over the mesh in backward."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _tp_sum(y: torch.Tensor, mesh) -> torch.Tensor:
    """Tensor parallel output: each rank's rows are a partial sum over its share of F; all-reduce them
    before the routing weights multiply in, so the router's gradient is whole on every rank."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def _grouped_mm():
    """torch's grouped GEMM (public ``F.grouped_mm`` from torch 2.10, else ``torch._grouped_mm``), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_gemm_ok(x: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the grouped GEMM runs here: CPU (torch 2.13 has a kernel, forward and backward), or
    CUDA in bf16 on SM80+ (the kernels torch ships); both need rows of whole 16-byte multiples, and
    under ``torch.compile`` bf16."""
    if _grouped_mm() is None or up.dtype != x.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # torch 2.13's meta kernel: bf16 only
        return False
    if any(d * x.element_size() % 16 for d in up.shape[1:]):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def expert_mlp(
    x: torch.Tensor, counts: list[int], gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor,
    act: Activation, grouped: bool | None = None,
) -> torch.Tensor:
    """Run tokens x [M, H], sorted by expert with ``counts[e]`` rows for expert e, through the experts.

    One grouped GEMM per projection for all experts where torch has one (``grouped_gemm_ok``), else
    a loop of plain matmuls over the experts (the reference; ``grouped=False`` forces it).
    """
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        x, up, down = x.to(dt), up.to(dt), down.to(dt)
        gate = gate.to(dt) if gate is not None else None
    if x.shape[0] == 0:  # no token reached these experts (possible on an expert-parallel rank)
        # Keep the weights in the graph: FSDP expects a gradient (zero here) on every rank.
        touch = up.sum() + down.sum() + (gate.sum() if gate is not None else 0.0)
        return x.new_zeros(0, down.shape[1]) + 0.0 * touch
    if grouped is None:
        grouped = grouped_gemm_ok(x, up)
    if grouped:
        mm = _grouped_mm()
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        h = mm(x, up.transpose(-2, -1), offs=offs)
        h = act(mm(x, gate.transpose(-2, -1), offs=offs)) * h if gate is not None else act(h)
        return mm(h, down.transpose(-2, -1), offs=offs)
    outs = []
    for e, part in enumerate(torch.split(x, counts)):
        if part.shape[0] == 0:
            continue
        h = F.linear(part, up[e])
        h = act(F.linear(part, gate[e])) * h if gate is not None else act(h)
        outs.append(F.linear(h, down[e]))
    return torch.cat(outs) if outs else x.new_zeros(0, down.shape[1])


class Experts(nn.Module):
    """E stacked expert MLPs; ``ep_group`` (set by expert parallelism) spreads them over ranks."""

    def __init__(self, cfg: ModelConfig, act: Activation):
        super().__init__()
        E, H, F_ = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_width
        self.num_experts = E
        self.gate = nn.Parameter(torch.empty(E, F_, H)) if cfg.gated else None
        self.up = nn.Parameter(torch.empty(E, F_, H))
        self.down = nn.Parameter(torch.empty(E, H, F_))
        self.act = act
        self.ep_group = None
        self.tp_mesh = None  # tensor parallel: every expert's hidden width F split over this mesh

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, H] sorted by global expert id, ``counts`` [E] rows per expert -> outputs in x's order."""
        gate = _local(self.gate) if self.gate is not None else None
        up, down = _local(self.up), _local(self.down)
        if self.tp_mesh is not None:
            return _tp_sum(expert_mlp(_tp_rows(x, self.tp_mesh), counts.tolist(), gate, up, down, self.act),
                           self.tp_mesh)
        if self.ep_group is None:
            return expert_mlp(x, counts.tolist(), gate, up, down, self.act)
        return self._exchange_and_run(x, counts, gate, up, down)

    def _exchange_and_run(self, x, counts, gate, up, down) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as fc

        group = self.ep_group
        ep = dist.get_world_size(group)
        local = self.num_experts // ep
        send = counts.view(ep, local)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # recv[s, e]: rank s's rows for my expert e
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        got = fc.all_to_all_single_autograd(x, out_splits, in_splits, group)
        got = fc.wait_tensor(got)
        # Arrivals are grouped by source rank, then expert: regroup by expert for the GEMMs.
        expert_of = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv.reshape(-1))
        order = torch.argsort(expert_of, stable=True)
        y = expert_mlp(got[order], recv.sum(0).tolist(), gate, up, down, self.act)
        y = y[torch.argsort(order)]
        return fc.wait_tensor(fc.all_to_all_single_autograd(y, in_splits, out_splits, group))


class MoE(nn.Module):
    """Router + experts (+ shared experts) in place of a block's MLP (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, act: Activation, shared: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.hidden_size, cfg.moe_num_experts, bias=False)
        self.experts = Experts(cfg, act)
        self.shared = shared
        self.aux: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's auxiliary losses: they hang on that forward's
        graph, which ``copy.deepcopy`` cannot copy (a reference model copied after training started)."""
        state = dict(super().__getstate__())
        state["aux"] = {}
        return state

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights [N, k] fp32, expert ids [N, k], logits [N, E] fp32) for tokens h [N, H]."""
        cfg = self.cfg
        if self.training and cfg.moe_jitter_eps:
            eps = cfg.moe_jitter_eps
            h = h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)
        logits = self.router(h).float()
        scores = router_scores(logits, cfg.moe_score_func)
        if cfg.moe_router_type == "sinkhorn" and self.training:
            chosen = sinkhorn(logits).topk(cfg.moe_top_k, dim=-1).indices
            weights = scores.gather(1, chosen)
        else:
            weights, chosen = scores.topk(cfg.moe_top_k, dim=-1)
        if cfg.moe_norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training:
            self.aux = {
                "moe_aux_loss": load_balancing_loss(scores, chosen, cfg.moe_num_experts),
                "moe_z_loss": router_z_loss(logits),
            }
        return weights, chosen, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, chosen, _ = self.route(h)
        N, k = chosen.shape
        E = cfg.moe_num_experts
        keep = None
        if cfg.moe_token_dropping:
            factor = cfg.moe_train_capacity_factor if self.training else cfg.moe_eval_capacity_factor
            capacity = max(cfg.moe_min_capacity, math.ceil(factor * N * k / E))
            keep = capacity_mask(chosen, E, capacity).reshape(-1)
        flat = chosen.reshape(-1)
        token = torch.arange(N, device=x.device).repeat_interleave(k)
        w = weights.reshape(-1)
        if keep is not None:
            flat, token, w = flat[keep], token[keep], w[keep]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        y = self.experts(h[token[order]], counts)
        y = y * w[order, None].to(y.dtype)
        out = torch.zeros(N, shape[-1], dtype=y.dtype, device=x.device).index_add_(0, token[order], y)
        if self.shared is not None:
            out = out + self.shared(h)
        return out.reshape(shape).to(x.dtype)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each auxiliary loss of the last training forward, averaged over MoE layers ({} for dense models)."""
    layers = [m.aux for m in moe_layers(model) if m.aux]
    if not layers:
        return {}
    return {name: torch.stack([a[name] for a in layers]).mean() for name in layers[0]}


def moe_aux_loss(model: nn.Module, cfg: ModelConfig) -> torch.Tensor | None:
    """The coefficient-weighted sum to add to the training loss (None when there is nothing to add)."""
    losses = moe_aux_losses(model)
    if not losses:
        return None
    total = cfg.moe_aux_loss_coeff * losses["moe_aux_loss"] + cfg.moe_z_loss_coeff * losses["moe_z_loss"]
    return total if (cfg.moe_aux_loss_coeff or cfg.moe_z_loss_coeff) else None


def check_moe_config(cfg: ModelConfig) -> None:
    """Fail early, naming the key, on MoE settings the model cannot build."""
    if cfg.moe_num_experts < 1:
        raise ConfigError(f"moe_num_experts must be >= 1, got {cfg.moe_num_experts}")
    if cfg.moe_num_experts == 1:
        return
    if not 1 <= cfg.moe_top_k <= cfg.moe_num_experts:
        raise ConfigError(f"moe_top_k {cfg.moe_top_k} must be between 1 and moe_num_experts {cfg.moe_num_experts}")
    if cfg.moe_expert_interval < 1:
        raise ConfigError(f"moe_expert_interval must be >= 1, got {cfg.moe_expert_interval}")
    bad = [i for i in cfg.moe_layers or () if not 0 <= i < cfg.num_layers]
    if bad:
        raise ConfigError(f"moe_layers {bad} are outside 0..{cfg.num_layers - 1} (num_layers)")
    if cfg.moe_token_dropping and min(cfg.moe_train_capacity_factor, cfg.moe_eval_capacity_factor) <= 0:
        raise ConfigError("moe_train_capacity_factor and moe_eval_capacity_factor must be > 0")
