"""RoPE scaling through conversion: LLaMA with llama3 scaling and OLMo-3 with YaRN on its
full-attention layers only. HF → neoxt gives HF's logits (and greedy tokens, and bf16 bits); neoxt →
HF gives back the same weights and the same rope_parameters; the config survives YAML."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hfkit import VOCAB, assert_same_state_dict, greedy, run_cli, save_hf_dir

import neoxt
from neoxt.errors import ConversionError
from neoxt.model import Transformer
from neoxt.model.hf_names import hf_config_from_model_config, hf_config_object, model_config_from_hf

CASES = ("llama3", "olmo3_yarn")
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# OLMo-3 long-context checkpoints: YaRN x8 with an explicit attention factor, full layers only.
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
        "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1}
TOKENS = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))  # 48 > window 8


def hf_config(case: str):
    from transformers import LlamaConfig, Olmo3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1, intermediate_size=96)
    if case == "llama3":
        return LlamaConfig(**common, num_hidden_layers=2, num_key_value_heads=2, rope_parameters=dict(LLAMA3))
    return Olmo3Config(**common, num_hidden_layers=4, sliding_window=8, rope_scaling=dict(YARN),
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


def hf_model(case: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(case), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(4.0)  # sharper logits: rotary differences show, greedy has no near-ties
    return model.to(dtype)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer_dir):
    """case → (HF model, neoxt run dir, HF re-export dir), converted through the CLI."""
    out = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case)
        model = hf_model(case)
        hf_dir = save_hf_dir(model, tiny_tokenizer_dir, root / "hf")
        assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(hf_dir), "--output-dir", str(root / "neoxt")]) == 0
        assert run_cli(["convert", "neoxt-to-hf", "--checkpoint", str(root / "neoxt"),
                        "--output-dir", str(root / "back")]) == 0
        out[case] = (model, root / "neoxt", root / "back")
    return out


def test_hf_rope_parameters_map_onto_the_config(converted):
    llama = neoxt.load_model(converted["llama3"][1]).cfg
    assert (llama.rope_scaling_type, llama.rope_scaling_factor, llama.rope_original_max_position_embeddings,
            llama.rope_low_freq_factor, llama.rope_high_freq_factor, llama.rope_scaling_layers) == \
        ("llama3", 8.0, 32, 1.0, 4.0, "all")
    olmo = neoxt.load_model(converted["olmo3_yarn"][1]).cfg
    assert (olmo.rope_scaling_type, olmo.rope_scaling_factor, olmo.rope_original_max_position_embeddings,
            olmo.rope_beta_fast, olmo.rope_beta_slow, olmo.rope_attention_factor, olmo.rope_scaling_layers) == \
        ("yarn", 8.0, 32, 32.0, 1.0, YARN["attention_factor"], "global")
    assert olmo.rotary_emb_base == 500000.0


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf_and_scaling_matters(converted, case):
    hf, run_dir, _ = converted[case]
    ours = neoxt.load_model(run_dir)
    with torch.no_grad():
        ref = hf(TOKENS).logits
        assert (ours(TOKENS) - ref).abs().max().item() <= 1e-4
        # The same weights without scaling (or, for OLMo-3, scaled on every layer) are far off:
        # the comparison above does see the rotary frequencies and which layers get them.
        wrong = [dataclasses.replace(ours.cfg, rope_scaling_type="none")]
        if case == "olmo3_yarn":
            wrong.append(dataclasses.replace(ours.cfg, rope_scaling_layers="all"))
        for cfg in wrong:
            other = Transformer(cfg).eval()
            other.load_state_dict(ours.state_dict())
            assert (other(TOKENS) - ref).abs().max().item() > 1e-2, cfg.rope_scaling_layers


@pytest.mark.parametrize("case", CASES)
def test_greedy_decoding_with_kv_cache_matches_hf_generate(converted, case):
    hf, run_dir, _ = converted[case]
    prompt = TOKENS[:1, :12]
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=1)[:, 12:]
    assert torch.equal(greedy(neoxt.load_model(run_dir), prompt, 24), expected)


@pytest.mark.parametrize("case", CASES)
def test_export_is_bit_identical_with_the_same_rope_config(converted, case):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf, _, back = converted[case]
    written = json.loads((back / "config.json").read_text())
    assert "rope_parameters" in written or "rope_scaling" in written
    reloaded_cfg = AutoConfig.from_pretrained(back)
    assert reloaded_cfg.rope_parameters == hf.config.rope_parameters
    if case == "olmo3_yarn":
        assert reloaded_cfg.rope_parameters["sliding_attention"]["rope_type"] == "default"
        assert reloaded_cfg.rope_parameters["full_attention"]["rope_type"] == "yarn"
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    assert_same_state_dict(hf, reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, hf(TOKENS).logits)


@pytest.mark.parametrize("case", CASES)
def test_config_round_trips_through_yaml(converted, case):
    from neoxt.config import config_to_yaml, load_config

    _, run_dir, _ = converted[case]
    cfg = load_config([str(run_dir / "config.yml")])
    assert cfg.model == model_config_from_hf(hf_config(case), "llama" if case == "llama3" else "olmo3")
    assert cfg.model.rope_scaling_type != "none"
    again = run_dir.parent / f"{case}-again.yml"
    again.write_text(config_to_yaml(cfg))
    assert load_config([str(again)]) == cfg


@pytest.mark.parametrize("case", CASES)
def test_bf16_logits_are_bit_identical(case, tmp_path):
    """The attention factor multiplies cos/sin in fp32 before rounding, as transformers does."""
    from transformers import AutoModelForCausalLM

    hf_model(case, torch.bfloat16).save_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    ours = neoxt.load_model(tmp_path / "hf")
    assert ours.embed.weight.dtype == torch.bfloat16 and ours.cfg.rope_scaling_type != "none"
    with torch.no_grad():
        assert torch.equal(ours(TOKENS), hf(TOKENS).logits)


@pytest.mark.parametrize("case", CASES)
def test_transformers4_rope_scaling_form_gives_the_same_config(case):
    """config.json with top-level rope_theta + rope_scaling (transformers 4) reads like rope_parameters."""
    arch = "llama" if case == "llama3" else "olmo3"
    new = hf_config(case).to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    if case == "llama3":
        old.update(rope_theta=LLAMA3["rope_theta"],
                   rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
    else:
        old.update(rope_theta=500000.0, rope_scaling=dict(YARN))
    a = model_config_from_hf(hf_config_object(new, arch), arch)
    b = model_config_from_hf(hf_config_object(json.loads(json.dumps(old)), arch), arch)
    assert a == b and a.rope_scaling_type == ("llama3" if case == "llama3" else "yarn")


def test_linear_and_default_attention_factor_round_trip():
    """Scaling on every OLMo-3 layer, and YaRN without an explicit attention factor, come back equal
    (YaRN's beta_fast/beta_slow are written explicitly, with transformers' defaults 32/1)."""
    from transformers import Olmo3Config

    per_type = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    hf = Olmo3Config(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                     intermediate_size=96, max_position_embeddings=256, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                     rope_parameters={"sliding_attention": dict(per_type), "full_attention": dict(per_type)})
    cfg = model_config_from_hf(hf, "olmo3")
    assert cfg.rope_scaling_layers == "all" and cfg.rope_attention_factor is None
    back = hf_config_from_model_config(cfg)
    with_betas = {**per_type, "beta_fast": 32, "beta_slow": 1}
    assert back.rope_parameters == {"sliding_attention": with_betas, "full_attention": with_betas}
    assert model_config_from_hf(back, "olmo3") == cfg
    from transformers import LlamaConfig

    linear = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                         rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    cfg = model_config_from_hf(linear, "llama")
    assert (cfg.rope_scaling_type, cfg.rope_scaling_factor) == ("linear", 2.0)
    assert hf_config_from_model_config(cfg).rope_parameters == linear.rope_parameters


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
     "rope_type 'longrope' is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": False}, "truncate=False"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "smoothing": 2.0},
     "key 'smoothing' is not supported"),
])
def test_unsupported_rope_scaling_is_a_one_line_error(rope, match):
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                     max_position_embeddings=256)
    hf.rope_parameters = {**rope, "rope_theta": 10000.0}
    with pytest.raises(ConversionError, match=match) as err:
        model_config_from_hf(hf, "llama", "x/config.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("x/config.json: ")


def test_olmo3_scaling_on_sliding_layers_only_is_refused(tmp_path, tiny_tokenizer_dir, capsys):
    """No neoxt equivalent: a one-line error from the CLI and no output directory."""
    model = hf_model("olmo3_yarn")
    params = model.config.rope_parameters
    params["sliding_attention"], params["full_attention"] = params["full_attention"], params["sliding_attention"]
    hf_dir = save_hf_dir(model, tiny_tokenizer_dir, tmp_path / "hf")
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(hf_dir), "--output-dir", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "rope_parameters differ between layer types" in line
    assert not (tmp_path / "out").exists()
