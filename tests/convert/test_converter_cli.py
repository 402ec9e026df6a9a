"""Converter command lines as the users type them (the fork's habits): ``hf-to-neoxt --revision
--dtype bfloat16 --save-tokenizer --tp``, a default ``--output-dir``, the model-only
``neox_config.yml`` converters write, and ``neox-to-neoxt`` reading the fork's ``neox_config.json``."""

from __future__ import annotations

import json

import pytest
import torch
from hfkit import hf_model, run_cli, save_hf_dir

from neoxt.config import load_config

SFT = {"finetune": True, "train_iters": 30, "seq_length": 64, "optimizer": {"type": "Adam", "params": {"lr": 1.0e-5}},
       "extra_save_iters": [0], "precision": "bfloat16", "init_method": "small_init"}


def test_hf_to_neoxt_fork_flags_default_output_and_model_only_snippet(tmp_path, tiny_tokenizer_dir, capsys):
    import neoxt

    src = save_hf_dir(hf_model("llama"), tiny_tokenizer_dir, tmp_path / "llama-tiny")
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(src), "--dtype", "bfloat16", "--tp", "2"]) == 0
    err = capsys.readouterr().err
    out = tmp_path / "llama-tiny-neoxt"  # default: <name>-neoxt beside the model
    assert "--tp 2 is not needed: neoxt checkpoints reshard on load" in err and str(out / "neox_config.yml") in err
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # --save-tokenizer is on by default
    model = neoxt.load_model(out)
    assert model.embed.weight.dtype == torch.bfloat16

    # The model-only snippet merges with an SFT config (no key set twice) into the same model.
    (tmp_path / "sft.yml").write_text(json.dumps(dict(SFT, load=str(out))))
    merged = load_config([str(out / "neox_config.yml"), str(tmp_path / "sft.yml")])
    full = load_config([str(out / "config.yml")])
    assert merged.model == full.model.__class__(**{**full.model.__dict__, "init_method": "small_init"})
    assert merged.checkpoint.finetune and merged.optimizer.lr == pytest.approx(1e-5)

    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(tmp_path / "nt"),
                    "--no-save-tokenizer", "--dtype", "float32"]) == 0
    assert not (tmp_path / "nt" / "tokenizer").exists() and (tmp_path / "nt" / "neox_config.yml").is_file()


def test_hf_to_neoxt_dtype_float16(tmp_path, tiny_tokenizer_dir):
    import neoxt

    hf = hf_model("gpt_neox")
    src = save_hf_dir(hf, tiny_tokenizer_dir, tmp_path / "src")
    out = tmp_path / "fp16"
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(out), "--dtype", "float16",
                    "--no-save-tokenizer"]) == 0
    sd = neoxt.load_model(out).state_dict()
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    assert torch.equal(sd["embed.weight"], hf.gpt_neox.embed_in.weight.half())  # cast once, from the source
    assert load_config([str(out / "config.yml")]).training.precision == "fp16"  # the run trains in what it holds


def test_hf_to_neoxt_revision(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    import huggingface_hub

    src = save_hf_dir(hf_model("gpt_neox"), tiny_tokenizer_dir, tmp_path / "snapshot")
    asked = []

    def fake_download(repo_id, revision=None, allow_patterns=None, **kw):
        asked.append((repo_id, revision))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", "org/sfm-tiny", "--revision", "global_step1000"]) == 0
    assert asked[0] == ("org/sfm-tiny", "global_step1000") and (tmp_path / "sfm-tiny-neoxt" / "latest").is_file()
    capsys.readouterr()
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(src), "--revision", "main",
                    "--output-dir", str(tmp_path / "x")]) == 2
    assert "a revision applies to Hub ids" in capsys.readouterr().out and not (tmp_path / "x").exists()


def test_neox_to_neoxt_reads_the_forks_neox_config_json(tmp_path):
    from test_neox_import import build_hf, hf_to_neox_shards, write_neox

    import neoxt

    hf = build_hf("llama")
    write_neox(hf_to_neox_shards(hf, "llama", 1), tmp_path / "save", "sequential", iteration=3, fork_nesting=True)
    (tmp_path / "save" / "neox_config.json").write_text(json.dumps({  # the fork's converter's shape
        "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2, "seq_length": 32,
        "max_position_embeddings": 64, "vocab_size": 128, "intermediate_size": 96, "norm": "rmsnorm",
        "rms_norm_epsilon": 1e-6, "activation": "swiglu", "use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
        "use_bias_in_norms": False, "pos_emb": "rotary", "rotary_pct": 1.0, "rotary_emb_base": 10000,
        "no_weight_tying": True, "precision": "float32", "attention_config": [["flash"], 2],
    }))
    assert run_cli(["convert", "neox-to-neoxt", "--input-dir", str(tmp_path / "save")]) == 0
    run = tmp_path / "save-neoxt"
    assert (run / "neox_config.yml").is_file()
    tokens = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (neoxt.load_model(run)(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
