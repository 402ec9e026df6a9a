"""MoE acceptance 1: Mixtral, OLMoE and Qwen3-MoE convert HF → neoxt → HF through the CLI with the
same logits (fp32, ≤1e-4), bit-identical weights back, and greedy decoding equal to HF ``generate``."""

from __future__ import annotations

import json

import pytest
import torch
from hfkit import assert_same_state_dict, greedy, round_trip
from moekit import MOE_ARCHS, hf_moe_model

import neoxt
from neoxt.errors import ConversionError


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer_dir):
    """arch → (HF model, HF dir, neoxt run dir, HF re-export dir)."""
    out = {}
    for arch in MOE_ARCHS:
        root = tmp_path_factory.mktemp(arch)
        model = hf_moe_model(arch)
        out[arch] = (model, *round_trip(model, tiny_tokenizer_dir, root, max_shard_size="100KB"))
    return out


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_logits_match_hf(converted, arch):
    hf, hf_dir, run_dir, _ = converted[arch]
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        for source in (run_dir, hf_dir):
            ours = neoxt.load_model(source)
            assert ours.cfg.moe_num_experts == 4 and ours.cfg.moe_router_type == "topk"
            assert (ours(tokens) - ref).abs().max().item() <= 1e-4, source


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_export_is_bit_identical_and_loads_with_transformers(converted, arch):
    from transformers import AutoModelForCausalLM

    hf, _, _, back = converted[arch]
    reloaded = AutoModelForCausalLM.from_pretrained(back)
    assert type(reloaded) is type(hf)
    assert_same_state_dict(hf, reloaded)
    saved, ref = json.loads((back / "config.json").read_text()), hf.config.to_dict()
    for key in ("num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size", "mlp_only_layers",
                "num_local_experts", "num_experts", "router_aux_loss_coef"):
        assert saved.get(key) == ref.get(key), key


def test_qwen3_moe_dense_layer_and_config(converted):
    _, _, run_dir, _ = converted["qwen3_moe"]
    cfg = neoxt.load_model(run_dir).cfg
    assert cfg.moe_layers == (0, 2) and cfg.moe_intermediate_size == 32 and cfg.intermediate_size == 48
    assert cfg.use_head_qk_norms and cfg.moe_norm_topk_prob


def test_moe_greedy_decoding_matches_hf_generate(converted):
    hf, _, run_dir, _ = converted["mixtral"]
    ours = neoxt.load_model(run_dir)
    prompt = torch.randint(2, 320, (1, 10), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=1)[:, 10:]
    assert expected.shape == (1, 24)
    assert torch.equal(greedy(ours, prompt, 24), expected)


def test_moe_config_hf_cannot_hold_is_refused():
    from neoxt.model import preset
    from neoxt.model.hf_names import hf_config_from_model_config

    cfg = preset("llama-tiny", padded_vocab_size=320, moe_num_experts=4, moe_top_k=2,
                 moe_num_shared_experts=1, moe_norm_topk_prob=True)
    with pytest.raises(ConversionError, match="MixtralForCausalLM: moe_num_shared_experts must be 0"):
        hf_config_from_model_config(cfg)


def test_moe_batched_generation_equals_hf_generate(converted):
    """neoxt's generator (left-padded batch, KV cache) on Qwen3-MoE (dense + MoE layers) == HF generate."""
    from neoxt.generate import SamplingParams, generate_tokens

    hf, _, run_dir, _ = converted["qwen3_moe"]
    ours = neoxt.load_model(run_dir)
    prompts = [[5, 17, 42, 9, 88, 101, 7, 3, 19], [200, 12], [64, 64, 3, 250, 31]]
    width = max(map(len, prompts))
    ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                          pad_token_id=1, eos_token_id=None)[:, width:]
    out = generate_tokens(ours, prompts, SamplingParams(maximum_tokens=16), pad_id=1)
    assert [list(d.tokens) for d in out] == ref.tolist()


def test_dense_model_with_head_qk_norms_is_refused_not_silently_dropped():
    from neoxt.model import preset
    from neoxt.model.hf_names import hf_config_from_model_config

    with pytest.raises(ConversionError, match="use_head_qk_norms is supported for Qwen3-MoE only"):
        hf_config_from_model_config(preset("llama-tiny", padded_vocab_size=320, use_head_qk_norms=True))
