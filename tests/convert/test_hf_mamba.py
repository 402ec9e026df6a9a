"""HF MambaForCausalLM / Mamba2ForCausalLM → neoxt → HF: same logits as transformers' torch path,
bit-identical weights back, greedy generation (recurrent state cache, padded batches) equal to HF."""

from __future__ import annotations

import json

import pytest
import torch
from hfkit import assert_same_state_dict, greedy, round_trip, run_cli
from mambakit import hf_model

import neoxt
from neoxt.config import load_config
from neoxt.generate import SamplingParams, generate_tokens

ARCHS = ("mamba", "mamba2")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer_dir):
    """arch → (HF model, HF dir, neoxt run dir, HF re-export dir), each converted through the CLI."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(arch)
        model = hf_model(arch)
        out[arch] = (model, *round_trip(model, tiny_tokenizer_dir, root, max_shard_size="40KB", back_shard_size=None))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(converted, arch):
    hf, hf_dir, run_dir, _ = converted[arch]
    tokens = torch.randint(0, 320, (2, 45), generator=torch.Generator().manual_seed(0))  # 45: ragged chunks
    with torch.no_grad():
        ref = hf(tokens).logits
        for source in (run_dir, hf_dir):
            ours = neoxt.load_model(source)
            assert ours.cfg.attention_types == (arch, arch)
            assert (ours(tokens) - ref).abs().max().item() <= 1e-4, source


@pytest.mark.parametrize("arch", ARCHS)
def test_export_is_bit_identical_and_loads_with_transformers(converted, arch):
    from transformers import AutoModelForCausalLM

    hf, _, run_dir, back = converted[arch]
    reloaded = AutoModelForCausalLM.from_pretrained(back)
    assert type(reloaded) is type(hf)
    assert_same_state_dict(hf, reloaded)
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] == (arch == "mamba")
    cfg = load_config([str(run_dir / "config.yml")]).model  # the generated config resolves to the same model
    assert cfg == neoxt.load_model(run_dir).cfg and cfg.mamba_inner == 64


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_matches_hf_generate(converted, arch):
    hf, _, run_dir, _ = converted[arch]
    ours = neoxt.load_model(run_dir)
    prompt = torch.randint(2, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None  # exactly 24 tokens, no early stop
    expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=1)[:, 12:]
    got = greedy(ours, prompt, 24)  # prefill once, then one token per forward through the state cache
    assert expected.shape == (1, 24) and torch.equal(got, expected)


def test_padded_batch_generation_matches_each_prompt_alone(converted):
    """Left padding is zeroed before the conv and the scan: a padded row decodes as its prompt alone."""
    hf, _, run_dir, _ = converted["mamba"]
    ours = neoxt.load_model(run_dir)
    hf.generation_config.eos_token_id = None
    prompts = [[5, 17, 99, 3, 250, 41, 7, 8, 9], [60, 61, 62], [200, 12, 13, 14, 15]]
    params = SamplingParams(maximum_tokens=10)
    batched = generate_tokens(ours, prompts, params, pad_id=1)
    uncached = generate_tokens(ours, prompts, params, pad_id=1, use_cache=False)
    for prompt, row, slow in zip(prompts, batched, uncached, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=1)
        assert list(row.tokens) == ref[0, len(prompt):].tolist() == list(slow.tokens)


def test_hybrid_export_is_refused_in_one_line(tmp_path, capsys):
    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_to_yaml
    from neoxt.config.schema import DataConfig, ModelConfig, RunConfig
    from neoxt.model import Transformer

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=4, intermediate_size=64,
                      padded_vocab_size=64, norm="rmsnorm", attention_types=("mamba", "global"))
    save_checkpoint(tmp_path / "run", 1, {"model": Transformer(cfg).state_dict()},
                    config_to_yaml(RunConfig(model=cfg, data=DataConfig(seq_length=64))))
    assert run_cli(["convert", "neoxt-to-hf", "--checkpoint", str(tmp_path / "run"),
                    "--output-dir", str(tmp_path / "hf")]) == 2
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "mix attention and Mamba" in out
    assert not (tmp_path / "hf").exists()
