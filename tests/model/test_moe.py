"""The MoE MLP: routing, experts, capacity, auxiliary losses, parameter/FLOP counts, and the aux loss
reaching the trainer's backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neoxt.model import Transformer, flops_per_token, num_params, preset
from neoxt.model.moe import MoE, capacity_mask, load_balancing_loss, moe_layers, router_z_loss, sinkhorn
from neoxt.model.transformer import _ACTIVATIONS


def _moe_cfg(**kw):
    base = dict(moe_num_experts=4, moe_top_k=2, moe_router_type="topk", moe_norm_topk_prob=True)
    return preset("llama-tiny", **{**base, **kw})


def _moe(cfg, seed=0) -> MoE:
    torch.manual_seed(seed)
    m = MoE(cfg, _ACTIVATIONS[cfg.activation])
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _reference(m: MoE, x: torch.Tensor, score_func="softmax", norm=True) -> torch.Tensor:
    """Token by token: sum over its top-k experts of weight * expert(x)."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = m.router(x[n]).float()
        scores = torch.sigmoid(logits) if score_func == "sigmoid" else logits.softmax(-1)
        w, idx = scores.topk(m.cfg.moe_top_k)
        if norm:
            w = w / w.sum()
        for wk, e in zip(w, idx, strict=True):
            ex = m.experts
            h = F.silu(ex.gate[e] @ x[n]) * (ex.up[e] @ x[n])
            out[n] += wk * (ex.down[e] @ h)
    return out


@pytest.mark.parametrize(("score_func", "norm"), [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_moe_equals_token_by_token_reference(score_func, norm):
    m = _moe(_moe_cfg(moe_score_func=score_func, moe_norm_topk_prob=norm)).eval()
    x = torch.randn(3, 7, 64)
    got = m(x)
    ref = _reference(m, x.reshape(-1, 64), score_func, norm).reshape(x.shape)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_shared_experts_add_a_dense_mlp():
    model = Transformer(_moe_cfg(moe_num_shared_experts=2))
    layer = model.layers[0].mlp
    assert layer.shared.up.weight.shape == (2 * 172, 64) and layer.shared.up.bias is None
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        full = layer(x)
        shared = layer.shared(x)
        layer.shared = None
        torch.testing.assert_close(full - shared, layer(x), atol=1e-6, rtol=1e-6)


def test_capacity_keeps_first_choices_then_earlier_tokens():
    chosen = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    keep = capacity_mask(chosen, 4, capacity=2)
    # expert 0: first choices of tokens 0 and 1 fit, token 2's first choice and token 3's second do not
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]


def test_token_dropping_drops_contributions_and_dropless_does_not():
    cfg = _moe_cfg(moe_token_dropping=True, moe_min_capacity=1, moe_eval_capacity_factor=0.25)
    m = _moe(cfg).eval()
    x = torch.randn(1, 16, 64)
    dropped = m(x)
    m.cfg = _moe_cfg()
    dropless = m(x)
    ref = _reference(m, x[0]).reshape(x.shape)
    torch.testing.assert_close(dropless, ref, atol=1e-5, rtol=1e-5)
    # capacity max(1, ceil(0.25 x 16 x 2 / 4)) = 2 per expert: 8 of the 32 assignments survive
    weights, chosen, _ = m.route(x[0])
    keep = capacity_mask(chosen, 4, 2)
    assert keep.sum().item() == 8
    expected = torch.zeros(16, 64)
    for n, k in keep.nonzero().tolist():
        e, ex = chosen[n, k], m.experts
        h = F.silu(ex.gate[e] @ x[0, n]) * (ex.up[e] @ x[0, n])
        expected[n] += weights[n, k] * (ex.down[e] @ h)
    torch.testing.assert_close(dropped[0], expected, atol=1e-5, rtol=1e-5)


def test_sinkhorn_balances_while_training_and_is_plain_topk_in_eval():
    logits = torch.randn(64, 4) + torch.tensor([3.0, 0.0, 0.0, 0.0])  # expert 0 favoured
    plain = logits.topk(1).indices.flatten().bincount(minlength=4)
    balanced = sinkhorn(logits).topk(1).indices.flatten().bincount(minlength=4)
    assert plain.max() > 40 and balanced.max() < plain.max()
    m = _moe(_moe_cfg(moe_router_type="sinkhorn", moe_top_k=1, moe_norm_topk_prob=False))
    x = torch.randn(64, 64)
    m.eval()
    _, eval_choice, _ = m.route(x)
    assert torch.equal(eval_choice, m.router(x).float().softmax(-1).topk(1).indices)


def test_aux_losses():
    uniform = torch.full((8, 4), 0.25)
    chosen = torch.arange(8).remainder(4)[:, None]
    assert load_balancing_loss(uniform, chosen, 4).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(8, 4)
    assert load_balancing_loss(skewed, torch.zeros(8, 1, dtype=torch.long), 4).item() == pytest.approx(4 * 0.7)
    logits = torch.randn(5, 4)
    assert router_z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item())


def test_model_aux_loss_is_recorded_in_training_only_and_weighted():
    model = Transformer(_moe_cfg(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01))
    tokens = torch.randint(0, 512, (2, 8))
    model.eval()
    model(tokens)
    assert model.aux_losses() == {} and model.aux_loss() is None
    model.train()
    model(tokens)
    parts = model.aux_losses()
    assert set(parts) == {"moe_aux_loss", "moe_z_loss"}
    expected = 0.1 * parts["moe_aux_loss"] + 0.01 * parts["moe_z_loss"]
    torch.testing.assert_close(model.aux_loss(), expected)


def test_trainer_backward_includes_the_aux_loss():
    from neoxt.train.objectives.lm import accumulate_gradients

    batch = {"tokens": torch.randint(0, 512, (2, 8)), "labels": torch.randint(0, 512, (2, 8))}
    grads = {}
    for coeff in (0.0, 1.0):
        torch.manual_seed(0)
        model = Transformer(_moe_cfg(moe_aux_loss_coeff=coeff)).train()
        aux: dict[str, float] = {}
        loss = accumulate_gradients(model, [batch, batch], aux=aux)
        grads[coeff] = model.layers[0].mlp.router.weight.grad.clone()
        assert set(aux) == {"moe_aux_loss", "moe_z_loss"}
    # same LM loss is reported, but the router gradient moves by the aux loss's own gradient
    assert not torch.allclose(grads[0.0], grads[1.0])
    torch.manual_seed(0)
    model = Transformer(_moe_cfg(moe_aux_loss_coeff=1.0)).train()
    model(batch["tokens"])
    model.aux_loss().backward()
    torch.testing.assert_close(grads[1.0] - grads[0.0], model.layers[0].mlp.router.weight.grad, atol=1e-6, rtol=1e-4)
    assert loss.item() > 0


def test_param_count_and_active_flops():
    cfg = _moe_cfg(moe_num_shared_experts=1, moe_expert_interval=2, num_layers=4,
                   attention_types=("global",) * 4, padded_vocab_size=512)
    model = Transformer(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    dense = preset("llama-tiny", num_layers=4, attention_types=("global",) * 4, padded_vocab_size=512)
    per_expert = 3 * 64 * 172
    # MoE layers 0 and 2: router + (top-2 + 1 shared) experts active instead of one dense MLP
    extra_active = 2 * (64 * 4 + 3 * per_expert - per_expert)
    assert flops_per_token(cfg, 32) == flops_per_token(dense, 32) + 6 * extra_active


def test_grouped_gemm_equals_the_expert_loop_forward_and_backward():
    from neoxt.model.moe import expert_mlp, grouped_gemm_ok

    torch.manual_seed(0)
    counts = [3, 0, 5, 2]
    weights = [torch.randn(4, 12, 8, requires_grad=True), torch.randn(4, 12, 8, requires_grad=True),
               torch.randn(4, 8, 12, requires_grad=True)]
    # torch 2.13 has a CPU kernel (the default path there) for rows of whole 16-byte multiples
    assert grouped_gemm_ok(torch.zeros(1, 8), weights[1])
    assert not grouped_gemm_ok(torch.zeros(1, 8), torch.zeros(4, 6, 8))
    x = torch.randn(10, 8, requires_grad=True)
    g = torch.randn(10, 8)
    results = []
    for grouped in (True, False):
        for t in (x, *weights):
            t.grad = None
        y = expert_mlp(x, counts, *weights, F.silu, grouped=grouped)
        y.backward(g)
        results.append((y.detach(), x.grad.clone(), *(w.grad.clone() for w in weights)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_keeps_the_aux_loss_gradient():
    from neoxt.distributed.parallelize import apply_activation_checkpointing

    tokens = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = Transformer(_moe_cfg(moe_aux_loss_coeff=1.0, moe_z_loss_coeff=0.1)).train()
        if ac:
            apply_activation_checkpointing(model, "full")
        (model(tokens).pow(2).mean() + model.aux_loss()).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_aux_and_gradients():
    from neoxt.distributed.parallelize import apply_compile

    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Transformer(_moe_cfg(moe_aux_loss_coeff=1.0)).train()
        if compiled:
            apply_compile(model)
        loss = model(tokens).pow(2).mean() + model.aux_loss()
        loss.backward()
        results.append((loss.detach(), model.aux_losses()["moe_aux_loss"].detach(),
                        model.layers[0].mlp.router.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_xavier_init_uses_one_experts_fans_and_matches_torch_on_matrices():
    from torch import nn

    from neoxt.model.init import init_fn

    cfg = _moe_cfg(init_method="xavier_normal", moe_num_experts=16)
    fn = init_fn("xavier_normal", cfg, torch.Generator().manual_seed(0))
    matrix, expected = torch.empty(64, 32), torch.empty(64, 32)
    fn(matrix)
    nn.init.xavier_normal_(expected, generator=torch.Generator().manual_seed(0))
    assert torch.equal(matrix, expected)  # dense weights: unchanged from torch's initialiser
    experts = Transformer(cfg).layers[0].mlp.experts.up  # [16, 172, 64]
    assert experts.std().item() == pytest.approx((2 / (172 + 64)) ** 0.5, rel=0.05)


def test_a_moe_model_copies_after_a_training_forward():
    """The router's last auxiliary losses hang on the forward's graph: copies leave them out."""
    import copy

    cfg = preset("llama-tiny", moe_num_experts=4, moe_top_k=2, moe_router_type="topk", padded_vocab_size=64)
    model = Transformer(cfg).train()
    model(torch.randint(0, 64, (2, 8)))
    assert model.aux_losses()  # recorded by the training forward
    twin = copy.deepcopy(model)
    assert all(not m.aux for m in moe_layers(twin)) and all(m.aux for m in moe_layers(model))
    assert torch.equal(twin(torch.ones(1, 4, dtype=torch.long)), model(torch.ones(1, 4, dtype=torch.long)))
