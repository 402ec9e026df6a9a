"""HF export carries the special tokens and the chat template the users' eval pipeline needs, and
the GPT-NeoX head under the name transformers 4.x and 5.x both load (``embed_out``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hfkit import hf_model, run_cli, save_hf_dir

import neoxt
from conftest import CHAT_TEMPLATE
from neoxt.config import config_from_dict
from neoxt.data.tokenize import preprocess
from neoxt.train.loop import train


def test_bare_tokenizer_json_run_exports_eos_chat_template_and_stops(tmp_path, tiny_tokenizer_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bare = tmp_path / "tok"  # the users' layout: tokenizer.json + chat_template.jinja, nothing else
    bare.mkdir()
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", bare / "tokenizer.json")
    (bare / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": "hello world"}) + "\n" for _ in range(300)))
    tok_cfg = {"tokenizer_type": "HFTokenizer", "vocab_file": str(bare / "tokenizer.json")}
    cfg = config_from_dict({
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "max_position_embeddings": 32, "no_weight_tying": True, "train_micro_batch_size_per_gpu": 4,
        "train_iters": 40, "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}}, "lr_decay_style": "constant",
        "data_path": None, "split": "100,0,0", "log_interval": 100, "save": str(tmp_path / "run"),
        "index_cache_dir": str(tmp_path / "cache"), "precision": "fp32", **tok_cfg,
    } | {"data_path": preprocess([str(src)], str(tmp_path / "docs"), config_from_dict(tok_cfg).tokenizer,
                                 keys=("text",), append_eod=True).outputs["text"]})
    train(cfg, None, log=lambda m: None)
    out = tmp_path / "hf"
    assert run_cli(["convert", "neoxt-to-hf", "--checkpoint", str(tmp_path / "run"), "--output-dir", str(out)]) == 0

    eod = 0  # <|endoftext|> in the tiny tokenizer
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == eod
    assert tok.chat_template == CHAT_TEMPLATE
    assert "<|user|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eod
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eod
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in f.keys() and "lm_head.weight" not in f.keys()

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tok("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(prompt).logits - neoxt.load_model(tmp_path / "run")(prompt)).abs().max().item() <= 1e-5
        gen = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert gen[-1] == eod and len(gen) < 20, gen  # stopped at end-of-document
    assert tok.decode(gen[:-1]).strip() == "world"


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "olmo3"])
def test_source_special_ids_survive_hf_neoxt_hf(tmp_path, tiny_tokenizer_dir, arch):
    from transformers import AutoTokenizer

    model = hf_model(arch)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 5, 6, 7
    src = save_hf_dir(model, tiny_tokenizer_dir, tmp_path / "src")
    source_tok = AutoTokenizer.from_pretrained(src)  # a consistent source: its tokenizer names ids 5, 6, 7 too
    bos, eos, pad = source_tok.convert_ids_to_tokens([5, 6, 7])
    source_tok.add_special_tokens({"bos_token": bos, "eos_token": eos, "pad_token": pad})
    source_tok.save_pretrained(src)
    assert (source_tok.bos_token_id, source_tok.eos_token_id, source_tok.pad_token_id) == (5, 6, 7)
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(tmp_path / "run")]) == 0
    assert run_cli(["convert", "neoxt-to-hf", "--checkpoint", str(tmp_path / "run"),
                    "--output-dir", str(tmp_path / "back")]) == 0
    for name in ("config.json", "generation_config.json"):
        got = json.loads((tmp_path / "back" / name).read_text())
        assert (got["bos_token_id"], got["eos_token_id"], got["pad_token_id"]) == (5, 6, 7), name
    tok = AutoTokenizer.from_pretrained(tmp_path / "back")  # the exported tokenizer names the same tokens
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (5, 6, 7)
    again = tmp_path / "again"  # a second round trip keeps them too
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(tmp_path / "back"), "--output-dir", str(again)]) == 0
    assert run_cli(["convert", "neoxt-to-hf", "--checkpoint", str(again), "--output-dir", str(tmp_path / "b2")]) == 0
    got = json.loads((tmp_path / "b2" / "config.json").read_text())
    assert (got["bos_token_id"], got["eos_token_id"], got["pad_token_id"]) == (5, 6, 7)
    tok = AutoTokenizer.from_pretrained(tmp_path / "b2")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (5, 6, 7)
