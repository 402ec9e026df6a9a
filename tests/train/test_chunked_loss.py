"""The chunked output projection + loss (``neoxt.train.chunked_loss``) gives the plain full-logits
path's loss and gradients (<= 1e-5, fp32) for LM, SFT (masked labels), z-loss, DPO and KTO log-probs."""

from __future__ import annotations

import pytest
import torch

from neoxt.config.schema import ModelConfig, RunConfig
from neoxt.errors import ConfigError
from neoxt.model import Transformer
from neoxt.train.losses import dpo_loss
from neoxt.train.objectives.base import loss_chunk_size, token_logprobs, token_loss_sum
from neoxt.train.objectives.lm import accumulate_gradients

VOCAB = 97


def _model(tied: bool = False) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=4,
                                   intermediate_size=64, padded_vocab_size=VOCAB, no_weight_tying=not tied))


def _batch(masked: bool, rows: int = 2, seq: int = 23) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (rows, seq + 1), generator=g)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:].clone()}
    if masked:  # SFT: a prompt with no targets, and a loss_mask hiding some answer tokens
        batch["labels"][:, :7] = -100
        batch["loss_mask"] = (torch.rand(rows, seq, generator=g) > 0.3).float()
    return batch


def _grads(model: Transformer, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain: tuple, chunked: tuple) -> None:
    (loss_p, grads_p), (loss_c, grads_c) = plain, chunked
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=1e-5)
    assert grads_p.keys() == grads_c.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("masked", [False, True], ids=["lm", "sft_masked"])
@pytest.mark.parametrize("tied,z_loss", [(False, 0.0), (True, 1e-2)], ids=["untied", "tied_zloss"])
def test_lm_loss_chunked_equals_plain(masked, tied, z_loss):
    model, batch = _model(tied), _batch(masked)

    def run(chunk: int):
        loss = token_loss_sum(model, batch, "fp32", z_loss, chunk)
        return loss.detach(), _grads(model, loss)

    plain = run(0)
    for chunk in (7, 1024):  # chunks that do not divide the 46 tokens, and one chunk for everything
        _assert_same(plain, run(chunk))


@pytest.mark.parametrize("masked", [False, True], ids=["lm", "sft_masked"])
def test_lm_loss_recomputed_in_backward_equals_plain(masked):
    """The GPipe variant (logits recomputed in backward, nothing [V, H] held): same loss and gradients."""
    from neoxt.train.chunked_loss import linear_cross_entropy
    from neoxt.train.losses import token_mask

    model, batch = _model(), _batch(masked)
    labels, mask = batch["labels"], token_mask(batch["labels"], batch.get("loss_mask"))

    def run(chunk: int):
        if not chunk:
            loss = token_loss_sum(model, batch, "fp32", 1e-2, 0)
        else:
            head = lambda h, w: linear_cross_entropy(h, w, labels, mask, 1e-2, chunk, recompute=True)  # noqa: E731
            loss = model(batch["tokens"], head=head)
        return loss.detach(), _grads(model, loss)

    _assert_same(run(0), run(7))


def test_lm_accumulated_step_chunked_equals_plain():
    """Through the objective's global-batch accumulation (loss over the global token count)."""
    model = _model()
    micro = [_batch(True), _batch(False, rows=1)]

    def run(chunk: int):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, micro, chunk=chunk)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    _assert_same(run(0), run(5))


@pytest.mark.parametrize("masked", [False, True])
def test_dpo_logprobs_chunked_equal_plain(masked):
    model, batch = _model(), _batch(masked, rows=4)
    ref_c, ref_r = torch.tensor([-50.0, -60.0]), torch.tensor([-55.0, -52.0])

    def run(chunk: int):
        pi_c, pi_r = token_logprobs(model, batch, "fp32", chunk).sum(-1).chunk(2)
        loss = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1).mean()
        return loss.detach(), _grads(model, loss)

    _assert_same(run(0), run(9))


def test_token_logprobs_with_per_token_upstream_gradient():
    """KTO weighs each token's log-prob differently: any upstream gradient must match."""
    model, batch = _model(tied=True), _batch(True, rows=2)
    weights = torch.randn(2, 23, generator=torch.Generator().manual_seed(3))

    def run(chunk: int):
        logp = token_logprobs(model, batch, "fp32", chunk)
        loss = (logp * weights).sum()
        return logp.detach(), _grads(model, loss)

    _assert_same(run(0), run(4))


def test_chunked_eval_without_grad_matches():
    model, batch = _model(), _batch(True)
    with torch.no_grad():
        plain = token_loss_sum(model, batch, "fp32", 0.0, 0)
        chunked = token_loss_sum(model, batch, "fp32", 0.0, 8)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


def test_loss_chunk_size_config():
    cfg = RunConfig()
    assert loss_chunk_size(cfg) == 1024  # on by default
    from dataclasses import replace

    off = replace(cfg, training=replace(cfg.training, loss_chunk_size=0))
    assert loss_chunk_size(off) == 0
    tp = replace(cfg, parallelism=replace(cfg.parallelism, model_parallel_size=2))
    assert loss_chunk_size(tp) == 0  # tensor parallel keeps its sharded head
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        loss_chunk_size(replace(cfg, training=replace(cfg.training, loss_chunk_size=-1)))


def _reinforce_terms(model, reference, kl_impl: str, chunk: int):
    """REINFORCE's (log p of each label, KL term) through the objective's own method."""
    from types import SimpleNamespace

    from neoxt.train.objectives.reinforce import ReinforceObjective

    obj = ReinforceObjective.__new__(ReinforceObjective)
    obj.model, obj.reference, obj.chunk = model, reference, chunk
    obj.t = SimpleNamespace(fp32_reinforce=True, precision="fp32", kl_impl=kl_impl)
    return obj._token_terms(_batch(False))


@pytest.mark.parametrize("kl_impl", ["abs", "mse", "kl"])
def test_reinforce_terms_chunked_equal_plain_without_full_logits(kl_impl, monkeypatch):
    import neoxt.train.objectives.reinforce as reinforce

    model, reference = _model(), _model(tied=True)
    advantages = torch.randn(2, 1, generator=torch.Generator().manual_seed(5))

    def run(chunk: int):
        logp, kl = _reinforce_terms(model, reference, kl_impl, chunk)
        loss = (-logp * advantages + 0.1 * kl).sum()
        return torch.stack([logp.detach(), kl.detach()]), _grads(model, loss)

    plain = run(0)

    def full_logits(*args, **kwargs):
        raise AssertionError("the chunked path computed the full logits")

    monkeypatch.setattr(reinforce, "forward_logits", full_logits)
    _assert_same(plain, run(6))


def test_unlearning_steps_take_the_chunked_loss(monkeypatch):
    """Gradient-ascent / retain losses go through the LM loss with the run's loss_chunk_size."""
    from types import SimpleNamespace

    import neoxt.train.objectives.lm as lm
    from neoxt.train.objectives.unlearning import UnlearningObjective

    seen: list[int] = []
    real = lm.token_loss_sum

    def spy(model, batch, precision, z_loss=0.0, chunk=0):
        seen.append(chunk)
        return real(model, batch, precision, z_loss, chunk)

    monkeypatch.setattr(lm, "token_loss_sum", spy)
    obj = UnlearningObjective.__new__(UnlearningObjective)
    obj.model, obj.group, obj.lm = _model(), None, SimpleNamespace(precision="fp32", chunk=5)
    obj._loss([_batch(True)], 1.0, True)
    assert seen == [5]
