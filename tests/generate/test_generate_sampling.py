"""The KV-cache generator against itself and against HF's logits warpers (no conversion needed)."""

from __future__ import annotations

import pytest
import torch

from neoxt.errors import ConfigError, DataError
from neoxt.generate import SamplingParams, cut_at_stop, filter_logits, generate_tokens
from neoxt.model import Transformer, preset

PROMPTS = [[5, 17, 42, 9, 88, 101, 7], [300, 12], [64, 64, 3, 250]]


def _model(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset(name)).eval()
    with torch.no_grad():  # sharper predictions than the default init, so argmax ties never happen
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return model


@pytest.mark.parametrize("name", ["gpt-neox-tiny", "llama-tiny", "olmo3-tiny"])
def test_cache_and_recompute_agree_on_a_left_padded_batch(name):
    model = _model(name)
    # 7 + 16 positions: past olmo3-tiny's sliding window of 16, so the window is exercised too.
    params = SamplingParams(maximum_tokens=16)
    cached = generate_tokens(model, PROMPTS, params, use_cache=True)
    recomputed = generate_tokens(model, PROMPTS, params, use_cache=False)
    assert [c.tokens for c in cached] == [r.tokens for r in recomputed]
    assert all(len(c.tokens) == 16 and not c.finished for c in cached)
    # Each row of the padded batch equals the same prompt generated alone (padding is invisible).
    for prompt, row in zip(PROMPTS, cached):
        assert generate_tokens(model, [prompt], params)[0].tokens == row.tokens


def test_greedy_matches_a_manual_argmax_loop():
    model = _model("llama-tiny")
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    out = generate_tokens(model, [PROMPTS[0]], SamplingParams(maximum_tokens=10))[0]
    assert list(out.tokens) == seq[len(PROMPTS[0]) :]


def test_sampling_is_reproducible_under_a_seed():
    model = _model("gpt-neox-tiny")
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, maximum_tokens=16)

    def run(seed):
        return [c.tokens for c in generate_tokens(model, PROMPTS, params, generator=torch.Generator().manual_seed(seed))]

    assert run(3) == run(3)
    assert run(3) != run(4)
    greedy = [c.tokens for c in generate_tokens(model, PROMPTS, SamplingParams(maximum_tokens=16))]
    assert run(3) != greedy


def test_stop_tokens_end_rows_and_are_not_returned():
    model = _model("llama-tiny")
    free = generate_tokens(model, PROMPTS, SamplingParams(maximum_tokens=12))
    stop = free[1].tokens[4]
    first = free[1].tokens.index(stop)
    out = generate_tokens(model, PROMPTS, SamplingParams(maximum_tokens=12, stop_token_ids=(stop,)))
    assert out[1].tokens == free[1].tokens[:first] and out[1].finished
    for done, ref in zip(out, free):  # the other rows stop at their own first occurrence, if any
        cut = ref.tokens.index(stop) if stop in ref.tokens else len(ref.tokens)
        assert done.tokens == ref.tokens[:cut]
        assert done.finished == (stop in ref.tokens)


def test_stop_check_and_context_limit():
    model = _model("llama-tiny")
    free = generate_tokens(model, [PROMPTS[0]], SamplingParams(maximum_tokens=12))[0]
    out = generate_tokens(model, [PROMPTS[0]], SamplingParams(maximum_tokens=12), stop_check=lambda ids: len(ids) >= 5)[0]
    assert out.tokens == free.tokens[:5] and out.finished
    capped = generate_tokens(model, [PROMPTS[0]], SamplingParams(maximum_tokens=12), max_seq_len=10)[0]
    assert capped.tokens == free.tokens[:3] and not capped.finished
    with pytest.raises(DataError, match="no room"):
        generate_tokens(model, [PROMPTS[0]], SamplingParams(), max_seq_len=7)
    with pytest.raises(DataError, match="no tokens"):
        generate_tokens(model, [[]], SamplingParams())


def test_filter_logits_matches_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(16, 300) * 3
    for k in (1, 5, 50):
        ours = torch.isfinite(filter_logits(logits, top_k=k))
        theirs = torch.isfinite(TopKLogitsWarper(k)(None, logits.clone()))
        assert torch.equal(ours, theirs) and int(ours[0].sum()) == k
    for p in (0.1, 0.5, 0.9):
        ours = torch.isfinite(filter_logits(logits, top_p=p))
        theirs = torch.isfinite(TopPLogitsWarper(p)(None, logits.clone()))
        assert torch.equal(ours, theirs)
    both = torch.isfinite(filter_logits(logits, top_k=20, top_p=0.5))
    ref = torch.isfinite(TopPLogitsWarper(0.5)(None, TopKLogitsWarper(20)(None, logits.clone())))
    assert torch.equal(both, ref)
    # A tiny top_p still keeps the single most likely token.
    assert torch.equal(torch.isfinite(filter_logits(logits, top_p=1e-9)).sum(-1), torch.ones(16, dtype=torch.long))


def test_padding_rows_of_the_vocabulary_are_never_sampled():
    model = _model("llama-tiny")  # padded_vocab_size 512
    with torch.no_grad():
        model.lm_head.weight[300:] += 50.0 * model.lm_head.weight[300:].sign()  # make padding rows attractive
    params = SamplingParams(temperature=2.0, maximum_tokens=12)
    free = generate_tokens(model, PROMPTS, params, generator=torch.Generator().manual_seed(0))
    assert any(t >= 300 for c in free for t in c.tokens)  # the trap works without a limit
    limited = generate_tokens(model, PROMPTS, params, generator=torch.Generator().manual_seed(0), vocab_limit=300)
    assert all(t < 300 for c in limited for t in c.tokens)


def test_invalid_sampling_params_are_config_errors():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=1.5).check()
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1).check()


def test_cut_at_stop_uses_the_earliest_stop():
    assert cut_at_stop("abc.def\nghi", [".", "\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
