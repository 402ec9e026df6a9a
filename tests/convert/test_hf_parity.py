"""HF → neoxt → HF for GPTNeoX, LLaMA (GQA, tied and untied) and OLMo-3 (sliding + full layers):
same logits, same greedy tokens, bit-identical weights back, loadable by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from hfkit import ARCHS, assert_same_state_dict, hf_config, hf_model, round_trip, run_cli

import neoxt
from neoxt.model.hf_names import detect_architecture, hf_config_object, model_config_from_hf


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer_dir):
    """arch → (HF model, HF dir, neoxt run dir, HF re-export dir), each converted through the CLI."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(arch)
        model = hf_model(arch)
        hf_dir, run_dir, back = round_trip(model, tiny_tokenizer_dir, root)
        assert len(list(hf_dir.glob("model-*.safetensors"))) > 1  # sharded input
        out[arch] = (model, hf_dir, run_dir, back)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(converted, arch):
    hf, hf_dir, run_dir, _ = converted[arch]
    tokens = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))  # 48 > window 8
    with torch.no_grad():
        ref = hf(tokens).logits
        for source in (run_dir, run_dir / "global_step0", hf_dir):  # every load_model entry point
            ours = neoxt.load_model(source)
            assert not ours.training
            assert (ours(tokens) - ref).abs().max().item() <= 1e-4, source


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_matches_hf_generate(converted, arch):
    from hfkit import greedy

    hf, _, run_dir, _ = converted[arch]
    ours = neoxt.load_model(run_dir)
    prompt = torch.randint(2, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None  # exactly 32 tokens, no early stop
    expected = hf.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=1)[:, 12:]
    got = greedy(ours, prompt, 32)
    assert expected.shape == (1, 32)
    assert torch.equal(got, expected)
    # with-cache logits equal no-cache logits on the decoded sequence
    full = torch.cat([prompt, got], dim=1)
    with torch.no_grad():
        no_cache = ours(full)
        cache = neoxt.model.KVCache(ours.cfg, 1, 44)
        chunks = [ours(full[:, :12], kv_cache=cache)] + [ours(full[:, t:t + 1], kv_cache=cache) for t in range(12, 44)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), no_cache, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_is_bit_identical_and_loads_with_transformers(converted, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, _, _, back = converted[arch]
    assert len(list(back.glob("model-*.safetensors"))) > 1 and (back / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(back)
    assert type(reloaded) is type(hf)
    assert_same_state_dict(hf, reloaded)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == (arch == "llama_tied")
    tok = AutoTokenizer.from_pretrained(back)
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    assert tok.eos_token == "<|endoftext|>" and cfg["eos_token_id"] == 0


def test_run_dir_layout_and_config(converted):
    from neoxt.config import load_config

    _, _, run_dir, _ = converted["olmo3"]
    assert (run_dir / "latest").read_text().strip() == "global_step0"
    step = run_dir / "global_step0"
    assert {"config.yml", "meta.json", ".metadata"} <= {p.name for p in step.iterdir()}
    meta = json.loads((step / "meta.json").read_text())
    assert meta["iteration"] == 0 and meta["hf_architecture"] == "Olmo3ForCausalLM"
    cfg = load_config([str(run_dir / "config.yml")])
    assert cfg.model.attention_types == ("sliding", "sliding", "global", "sliding")
    assert cfg.model.sliding_window_width == 8 and cfg.model.rotary_emb_base == 500000.0
    assert cfg.tokenizer.tokenizer_type == "HFTokenizer"
    assert cfg.tokenizer.vocab_file == str(run_dir / "tokenizer" / "tokenizer.json")
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert "<|assistant|>" in (run_dir / "tokenizer" / "chat_template.jinja").read_text()
    assert not list(run_dir.parent.glob(".*tmp*"))


def test_dtype_and_iteration_options(converted, tmp_path):
    _, hf_dir, _, _ = converted["llama"]
    out = tmp_path / "bf16"
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(hf_dir), "--output-dir", str(out),
                    "--dtype", "bf16", "--iteration", "7"]) == 0
    assert (out / "latest").read_text().strip() == "global_step7"
    model = neoxt.load_model(out)
    assert model.embed.weight.dtype == torch.bfloat16
    assert "precision: bfloat16" in (out / "config.yml").read_text()
    as_fp32 = neoxt.load_model(out, dtype="fp32")
    assert as_fp32.embed.weight.dtype == torch.float32
    back = tmp_path / "back16"
    assert run_cli(["convert", "neoxt-to-hf", "--checkpoint", str(out / "global_step7"), "--output-dir",
                    str(back), "--dtype", "fp16"]) == 0
    assert json.loads((back / "config.json").read_text())["dtype"] == "float16"
    assert (back / "model.safetensors").is_file()  # small: one shard


@pytest.mark.parametrize("arch", ("gpt_neox", "llama", "olmo3"))
def test_transformers4_and_5_config_json_forms(arch):
    """Old config.json (rotary_pct / rotary_emb_base / rope_theta) and new (rope_parameters) agree."""
    new = hf_config(arch).to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    if arch == "gpt_neox":
        old.update(rotary_pct=0.5, rotary_emb_base=20000)
        new["rope_parameters"] = {"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5}
    elif arch == "llama":
        old.update(rope_theta=123456.0, rope_scaling=None)
        new["rope_parameters"] = {"rope_type": "default", "rope_theta": 123456.0}
    else:
        old.update(rope_theta=250000.0, rope_scaling=None)
        per_type = {"rope_type": "default", "rope_theta": 250000.0}
        new["rope_parameters"] = {"sliding_attention": dict(per_type), "full_attention": dict(per_type)}
    a = model_config_from_hf(hf_config_object(new, arch), arch)
    b = model_config_from_hf(hf_config_object(json.loads(json.dumps(old)), arch), arch)
    assert a == b
    assert a.rotary_emb_base == {"gpt_neox": 20000.0, "llama": 123456.0, "olmo3": 250000.0}[arch]
    assert a.rotary_pct == (0.5 if arch == "gpt_neox" else 1.0)
    assert detect_architecture(old, "x") == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_and_decoding_are_bit_identical(arch, tmp_path):
    """In bf16 we follow each architecture's rounding (OLMo-3: rotary and norm gains in fp32)."""
    from hfkit import greedy
    from transformers import AutoModelForCausalLM

    hf_model(arch).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    ours = neoxt.load_model(tmp_path / "hf")
    assert ours.embed.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(tokens), hf(tokens).logits)
    prompt = tokens[:1, :12]
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=1)[:, 12:]
    assert torch.equal(greedy(ours, prompt, 16), expected)


def test_chat_template_from_config_and_bare_tokenizer_json(tmp_path):
    """A GPT-NeoX-style run: tokenizer.json alone, chat template only in the config → both exported."""
    from transformers import AutoTokenizer

    from conftest import CHAT_TEMPLATE, train_tiny_tokenizer
    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_to_yaml
    from neoxt.config.schema import DataConfig, RunConfig, TokenizerConfig
    from neoxt.model import Transformer, preset

    tok_dir = train_tiny_tokenizer(tmp_path / "tok", chat_template=None)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    cfg = preset("llama-tiny", padded_vocab_size=320)
    run_cfg = RunConfig(model=cfg, data=DataConfig(seq_length=512), tokenizer=TokenizerConfig(
        "HFTokenizer", str(bare / "tokenizer.json"), None, str(tmp_path / "chat.jinja")))
    save_checkpoint(tmp_path / "run", 5, {"model": Transformer(cfg).state_dict()}, config_to_yaml(run_cfg))
    assert run_cli(["convert", "neoxt-to-hf", "--checkpoint", str(tmp_path / "run" / "global_step5"),
                    "--output-dir", str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok("Hello world").input_ids == AutoTokenizer.from_pretrained(tok_dir)("Hello world").input_ids
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
