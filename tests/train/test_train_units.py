"""Schedules, losses, optimizer groups and loss scaling, each against its definition."""

from __future__ import annotations

import math

import pytest
import torch

from neoxt.config.schema import ModelConfig, OptimizerConfig, ScheduleConfig, TrainingConfig
from neoxt.errors import ConfigError
from neoxt.train.losses import dpo_loss, lm_loss_sum, sequence_logprobs
from neoxt.train.optim import build_optimizer, param_groups
from neoxt.train.precision import LossScaler
from neoxt.train.schedule import build_schedule


def _sched(style, warmup=10, decay=100, min_lr=0.0, lr=1.0):
    return build_schedule(
        ScheduleConfig(lr_decay_style=style, lr_decay_iters=decay, warmup_iters=warmup, min_lr=min_lr), lr, 1000
    )


def test_warmup_matches_upstream():
    s = _sched("cosine")
    assert s.lr_at(0) == pytest.approx(0.1)  # max(1, 0) / 10
    assert s.lr_at(1) == pytest.approx(0.1)
    assert s.lr_at(5) == pytest.approx(0.5)
    assert s.lr_at(10) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "style,expected",
    [
        ("constant", lambda i: 1.0),
        ("linear", lambda i: (90 - (i - 10)) / 90),
        ("cosine", lambda i: 0.1 + 0.9 / 2 * (math.cos(math.pi * (i - 10) / 90) + 1)),
        ("exponential", lambda i: math.exp(-0.693 * (i - 10) / 90)),
    ],
)
def test_decay_styles(style, expected):
    s = _sched(style, min_lr=0.1 if style == "cosine" else 0.0)
    for i in (11, 40, 77, 100):
        assert s.lr_at(i) == pytest.approx(max(expected(i), s.min_lr))
    # Past lr_decay_iters the rate holds its end value.
    assert s.lr_at(500) == pytest.approx(s.lr_at(100))


def test_linear_floors_at_min_lr_and_default_decay_iters():
    s = build_schedule(ScheduleConfig(lr_decay_style="linear", warmup_iters=0, min_lr=0.05), 1.0, 20)
    assert s.decay_iters == 20
    assert s.lr_at(19) == pytest.approx(0.05)  # 1/20 would be below min_lr
    assert s.lr_at(10) == pytest.approx(0.5)


def test_lm_loss_sum_ignores_masked_and_negative_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    mask = torch.ones(2, 5)
    mask[1, 3] = 0
    s, n = lm_loss_sum(logits, labels, mask)
    keep = (labels >= 0) & (mask > 0)
    ref = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert int(n) == int(keep.sum()) == 8
    assert torch.allclose(s, ref)


def test_all_masked_batch_gives_zero_loss_and_zero_grad():
    logits = torch.randn(1, 4, 7, requires_grad=True)
    labels = torch.full((1, 4), -100)
    s, n = lm_loss_sum(logits, labels, torch.zeros(1, 4))
    (s / n.clamp(min=1)).backward()
    assert s.item() == 0.0 and n.item() == 0
    assert torch.count_nonzero(logits.grad) == 0 and torch.isfinite(logits.grad).all()


def test_z_loss_adds_logsumexp_square():
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, 2, -100]])
    base, _ = lm_loss_sum(logits, labels)
    with_z, _ = lm_loss_sum(logits, labels, z_loss=0.5)
    lse = torch.logsumexp(logits[0, :2], -1)
    assert with_z.item() == pytest.approx(base.item() + 0.5 * lse.square().sum().item(), rel=1e-5)


def test_dpo_loss_and_sequence_logprobs():
    logits = torch.zeros(1, 3, 4)  # uniform: log p = -log 4 per counted token
    labels = torch.tensor([[1, -100, 2]])
    assert sequence_logprobs(logits, labels).item() == pytest.approx(-2 * math.log(4))
    zero = torch.zeros(1)
    assert dpo_loss(zero, zero, zero, zero, 0.1).item() == pytest.approx(math.log(2))
    assert dpo_loss(torch.ones(1), zero, zero, zero, 1.0).item() < math.log(2)


def test_param_groups_no_decay_on_norms_and_biases():
    from neoxt.model import Transformer

    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, num_kv_heads=2, intermediate_size=32,
                      padded_vocab_size=32, attention_types=("global",))
    model = Transformer(cfg)
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay)
    assert all(not n.endswith(".bias") and "norm" not in n for n in decay)
    assert "embed.weight" in decay and "final_norm.weight" in no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert len(param_groups(model, 0.0)) == 1


def test_adam_is_decoupled_adamw_and_unknown_type_fails():
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model, OptimizerConfig(optimizer_type="adam", lr=0.1, weight_decay=0.5))
    assert isinstance(opt, torch.optim.AdamW)
    assert isinstance(build_optimizer(model, OptimizerConfig(optimizer_type="sgd")), torch.optim.SGD)
    with pytest.raises(ConfigError, match="lion"):
        build_optimizer(model, OptimizerConfig(optimizer_type="lion"))


def test_dynamic_loss_scaler_follows_deepspeed_rules():
    s = LossScaler.from_config(TrainingConfig(precision="fp16", initial_scale_power=4, loss_scale_window=2, hysteresis=2))
    assert s.scale == 16 and s.dynamic
    s.update(True)  # first overflow only uses up hysteresis
    assert s.scale == 16
    s.update(True)
    assert s.scale == 8
    s.update(False)
    s.update(False)
    assert s.scale == 16
    restored = LossScaler.from_config(TrainingConfig(precision="fp16", initial_scale_power=4))
    restored.load_state_dict(s.state_dict())
    assert restored.scale == 16
    assert LossScaler.from_config(TrainingConfig(precision="bf16")).scale == 1.0
    static = LossScaler.from_config(TrainingConfig(precision="fp16", loss_scale=128.0))
    static.update(True)
    assert static.scale == 128.0


def test_adamw_is_fused_for_plain_and_sharded_parameters(tmp_path):
    """One fused AdamW kernel per step, for FSDP2/TP/EP DTensor shards too (not foreach's passes)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from neoxt.config.schema import OptimizerConfig
    from neoxt.train.optim import build_optimizer

    plain = torch.nn.Linear(4, 4)
    assert build_optimizer(plain, OptimizerConfig()).defaults["fused"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = torch.nn.Linear(4, 4)
        sharded.weight = torch.nn.Parameter(distribute_tensor(sharded.weight.data, init_device_mesh("cpu", (1,)),
                                                              [Shard(0)]))
        opt = build_optimizer(sharded, OptimizerConfig())
        assert opt.defaults["fused"]
        for p in sharded.parameters():
            p.grad = torch.ones_like(p)
        before = sharded.weight.full_tensor().clone()
        opt.step()  # the fused kernel takes the DTensor shards
        assert not torch.equal(sharded.weight.full_tensor(), before)
    finally:
        dist.destroy_process_group()
