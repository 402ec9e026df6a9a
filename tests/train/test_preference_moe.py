"""MoE auxiliary losses in DPO and KTO: each micro-batch's *policy* forward adds its weighted load-
balancing and router z-loss (a mean over micro-batches) to the backward, the reported loss stays the
DPO / KTO loss, the unweighted losses reach the metrics, and with the coefficients at 0 (or a dense
model) the step is bit-identical to one without any auxiliary term."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from neoxt.config import config_from_dict
from neoxt.model import Transformer
from neoxt.train.objectives import OBJECTIVES, ObjectiveContext
from neoxt.train.objectives import dpo as dpo_module
from neoxt.train.objectives import kto as kto_module

BETA = 0.5
AUX, Z = 0.5, 0.1
T = 10


def _cfg(impl: str, aux: float = AUX, z: float = Z, experts: int = 4):
    return config_from_dict({
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": T, "max_position_embeddings": 32,
        "norm": "rmsnorm", "activation": "swiglu", "use_bias_in_mlp": False, "intermediate_size": 48, "padded_vocab_size": 64,
        "moe_num_experts": experts, "moe_top_k": 2, "moe_router_type": "topk", "moe_norm_topk_prob": True,
        "moe_aux_loss_coeff": aux, "moe_z_loss_coeff": z,
        "dataset_impl": "pairwise" if impl == "dpo" else "gpt2", "train_impl": impl,
        "dpo_beta": BETA, "kto_beta": BETA, "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.5,
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "seed": 1,
    })


def _objective(impl: str, **kw):
    """The registered objective on a fresh model; the policy is then moved away from the reference."""
    cfg = _cfg(impl, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    ctx = ObjectiveContext(cfg=cfg, model=model, mesh=None, group=None, dp_size=1, device=torch.device("cpu"),
                           fresh_start=True, load_weights=None, parallelize=lambda m: m, say=lambda m: None)
    objective = OBJECTIVES[impl](ctx)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return objective


def _micro(kto: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    micro = []
    for _ in range(2):
        tokens = torch.randint(0, 64, (4, T), generator=g)
        labels = torch.randint(0, 64, (4, T), generator=g)
        labels[:, :3] = -100  # the prompt does not count
        b = {"tokens": tokens, "labels": labels}
        if kto:
            b["reward"] = torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None].expand(4, T).clone()
        micro.append(b)
    return micro


def _seq_logps(model, b) -> torch.Tensor:
    """Per-token log p(label) [B, T] from full logits, 0 on the prompt."""
    logp = torch.log_softmax(model(b["tokens"]).float(), -1)
    mask = b["labels"] >= 0
    picked = logp.gather(-1, b["labels"].clamp(min=0)[..., None])[..., 0]
    return torch.where(mask, picked, torch.zeros_like(picked))


def _weighted_aux(policy, aux: float, z: float) -> tuple[torch.Tensor, dict[str, float]]:
    parts = policy.aux_losses()  # the policy's last (training) forward's router statistics
    return aux * parts["moe_aux_loss"] + z * parts["moe_z_loss"], {k: v.item() for k, v in parts.items()}


def _hand_dpo(policy, reference, micro, aux: float, z: float):
    """(sum of the DPO micro-losses, mean unweighted aux losses); grads of DPO loss + mean weighted aux."""
    pairs = sum(b["tokens"].shape[0] // 2 for b in micro)
    total, logged = 0.0, {}
    for b in micro:
        with torch.no_grad():
            ref_c, ref_r = _seq_logps(reference, b).sum(-1).chunk(2)
        pi_c, pi_r = _seq_logps(policy, b).sum(-1).chunk(2)
        loss = -F.logsigmoid(BETA * ((pi_c - pi_r) - (ref_c - ref_r))).sum() / pairs
        weighted, parts = _weighted_aux(policy, aux, z)
        (loss + weighted / len(micro)).backward()
        total += loss.item()
        logged = {k: logged.get(k, 0.0) + v / len(micro) for k, v in parts.items()}
    return total, logged


def _hand_kto(policy, reference, micro, aux: float, z: float):
    total, logged = 0.0, {}
    for b in micro:
        with torch.no_grad():
            ref = _seq_logps(reference, b)
            seq_reward = b["reward"].sum(-1)
            scaling = torch.where(seq_reward > 0, 1.0, 1.5)
        pol = _seq_logps(policy, b)
        ratio = (pol - ref).sum(-1)
        kl = [torch.clamp(r, min=0).mean().detach() for r in ratio.chunk(2)]
        halves = []
        for i, (r, w, s) in enumerate(zip(ratio.chunk(2), b["reward"].chunk(2), scaling.chunk(2), strict=True)):
            halves.append(0.5 * s.mean() * (1 - torch.sigmoid(BETA * w.mean(-1) * (r - kl[1 - i]))))
        loss = (halves[0] + halves[1]).mean() / len(micro)
        weighted, parts = _weighted_aux(policy, aux, z)
        (loss + weighted / len(micro)).backward()
        total += loss.item()
        logged = {k: logged.get(k, 0.0) + v / len(micro) for k, v in parts.items()}
    return total, logged


HAND = {"dpo": _hand_dpo, "kto": _hand_kto}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["dpo", "kto"])
def test_gradient_is_the_loss_plus_the_policy_forwards_weighted_aux(impl):
    objective = _objective(impl)
    micro = _micro(kto=impl == "kto")
    # A reference that records router statistics too must not change what the policy's term reads.
    objective.reference.train()
    policy, reference = copy.deepcopy(objective.model), copy.deepcopy(objective.reference).eval()
    bare = copy.deepcopy(objective.model)
    out = objective.train_batch(micro, 1.0)
    got = _grads(objective.model)

    expected_loss, expected_metrics = HAND[impl](policy, reference, micro, AUX, Z)
    want = _grads(policy)
    assert set(got) == set(want) and any("router" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    # the reported loss is the DPO / KTO loss alone; the metrics carry the unweighted aux losses
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert set(out.metrics) == {"moe_aux_loss", "moe_z_loss"}
    for key, value in expected_metrics.items():
        assert out.metrics[key] == pytest.approx(value, abs=1e-6)
    assert out.metrics["moe_aux_loss"] >= 0.9 and out.metrics["moe_z_loss"] > 0

    # The aux term is not negligible: without it the router gradients would differ well beyond 1e-6.
    HAND[impl](bare, reference, micro, 0.0, 0.0)
    router = "layers.0.mlp.router.weight"
    assert (bare.get_parameter(router).grad - got[router]).abs().max() > 1e-4


def _step(objective, micro):
    objective.model.zero_grad()
    out = objective.train_batch(micro, 4.0)  # an fp16-style loss scale multiplies everything
    return out, _grads(objective.model)


@pytest.mark.parametrize("impl", ["dpo", "kto"])
@pytest.mark.parametrize("case", ["coefficients 0", "dense"])
def test_zero_coefficients_and_dense_models_step_exactly_as_without_aux(impl, case, monkeypatch):
    kw = {"aux": 0.0, "z": 0.0} if case == "coefficients 0" else {"experts": 1}
    micro = _micro(kto=impl == "kto")
    out, grads = _step(_objective(impl, **kw), micro)
    # "Without aux": the objective's accumulate gets no auxiliary term at all (the code before MoE aux).
    module = dpo_module if impl == "dpo" else kto_module
    monkeypatch.setattr(module, "moe_aux_term", lambda *a, **k: None)
    plain_out, plain = _step(_objective(impl, **kw), micro)
    assert torch.equal(out.loss, plain_out.loss) and plain_out.metrics == {}
    assert set(grads) == set(plain)
    assert all(torch.equal(grads[n], plain[n]) for n in grads)
    # MoE with coefficients 0 still logs its (unweighted) losses; a dense model logs none
    assert set(out.metrics) == ({"moe_aux_loss", "moe_z_loss"} if case == "coefficients 0" else set())


@pytest.mark.parametrize("impl", ["dpo", "kto"])
def test_eval_batches_add_no_aux_and_log_nothing(impl):
    objective = _objective(impl)
    out = objective.eval_batch(_micro(kto=impl == "kto"))
    assert out.metrics == {} and all(p.grad is None for p in objective.model.parameters())


def test_gradient_ascent_still_descends_the_auxiliary_loss():
    """A negative loss_scale (unlearning's gradient-ascent steps) flips the loss, not the regulariser."""
    from neoxt.train.objectives.base import accumulate

    w = torch.tensor([1.5, -0.5], requires_grad=True)
    batch = {"tokens": torch.zeros(1, 1, dtype=torch.long)}
    accumulate([batch], lambda b: (w ** 2).sum(), loss_scale=-2.0, aux_loss=lambda: 3.0 * w.sum())
    torch.testing.assert_close(w.grad, -2.0 * 2 * w.detach() + 2.0 * 3.0)
