"""Activation checkpointing and torch.compile change memory/speed, never the loss (one process, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_worker  # noqa: E402

from neoxt.config.schema import ParallelismConfig  # noqa: E402
from neoxt.distributed.parallelize import parallelize  # noqa: E402


def _parallel(arch: str, **par) -> torch.nn.Module:
    model = dist_worker.build(arch)
    cfg = dist_worker.run_config(arch, ParallelismConfig(**par))
    return parallelize(model, cfg, None)


def _saved_activation_bytes(model: torch.nn.Module) -> int:
    """Bytes autograd keeps for backward during one forward (what checkpointing trades away)."""
    tokens, labels = dist_worker.batch()
    total = 0
    params = {p.data_ptr() for p in model.parameters()}

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = dist_worker.ce(model(tokens), labels)
    loss.backward()
    return total


@pytest.mark.parametrize("arch", ["llama", "olmo3"])
def test_activation_checkpointing_keeps_loss_and_saves_memory(arch):
    ref = dist_worker.train_plain(dist_worker.build(arch))
    names = [n for n, _ in dist_worker.build(arch).named_parameters()]
    base_mem = _saved_activation_bytes(dist_worker.build(arch))
    for mode in ("full", "selective"):
        model = _parallel(arch, checkpoint_activations=True, activation_checkpointing_mode=mode)
        assert [n for n, _ in model.named_parameters()] == names  # checkpoints stay interchangeable
        assert set(model.state_dict()) == set(dist_worker.build(arch).state_dict())
        assert dist_worker.train_plain(model) == pytest.approx(ref, abs=1e-6), mode
        mem = _saved_activation_bytes(_parallel(arch, checkpoint_activations=True, activation_checkpointing_mode=mode))
        # full keeps only block inputs; selective drops attention's q/k/v/scores but keeps the MLP's.
        limit = 0.5 if mode == "full" else 0.9
        assert mem < limit * base_mem, (mode, mem, base_mem)


def test_checkpoint_num_layers_above_one_warns_and_still_checkpoints():
    with pytest.warns(UserWarning, match="checkpoint_num_layers=2"):
        model = _parallel("llama", checkpoint_activations=True, checkpoint_num_layers=2)
    assert _saved_activation_bytes(model) < 0.5 * _saved_activation_bytes(dist_worker.build("llama"))


def test_compile_keeps_loss():
    """One tiny model, compiled per block (cold compile: ~10-30 s on 2 CPU cores), with checkpointing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = dist_worker.train_plain(dist_worker.build("llama"), steps=2)
    model = _parallel("llama", compile=True)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)
    assert dist_worker.train_plain(model, steps=2) == pytest.approx(ref, abs=2e-5)
    model = _parallel("llama", compile=True, checkpoint_activations=True)
    assert dist_worker.train_plain(model, steps=2) == pytest.approx(ref, abs=2e-5)
    assert counters["stats"]["unique_graphs"] >= 2  # it really compiled (plain and checkpointed)


@pytest.mark.parametrize("option", ["op", "2"])
def test_selective_ac_policies_keep_loss_and_grads_and_save_memory(option):
    """torchtitan's selective options from the config: per-op policy, every-N-th block."""
    ref_model = dist_worker.build("llama")
    tokens, labels = dist_worker.batch()
    dist_worker.ce(ref_model(tokens), labels).backward()
    model = _parallel("llama", checkpoint_activations=True, activation_checkpointing_mode="selective",
                      selective_ac_option=option)
    loss = dist_worker.ce(model(tokens), labels)
    loss.backward()
    torch.testing.assert_close(loss, dist_worker.ce(ref_model(tokens), labels), rtol=0, atol=1e-6)
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    base = _saved_activation_bytes(dist_worker.build("llama"))
    mem = _saved_activation_bytes(_parallel("llama", checkpoint_activations=True,
                                            activation_checkpointing_mode="selective", selective_ac_option=option))
    assert mem < 0.9 * base, (option, mem, base)


def test_selective_ac_option_from_yaml_and_bad_value():
    from neoxt.config import config_from_dict
    from neoxt.errors import ConfigError

    assert config_from_dict({"selective_ac_option": "op"}).parallelism.selective_ac_option == "op"
    assert config_from_dict({"selective_ac_option": 2}).parallelism.selective_ac_option == 2
    with pytest.raises(ConfigError, match="selective_ac_option"):
        _parallel("llama", checkpoint_activations=True, activation_checkpointing_mode="selective",
                  selective_ac_option="sometimes")
