"""`neoxt convert neox-to-neoxt | neoxt-to-neox | inspect` end to end through the CLI."""

from __future__ import annotations

import json

import torch
from test_neox_import import SEQ, VOCAB, build_hf, hf_to_neox_shards, write_neox

from neoxt.cli import main


def _error_line(text: str) -> str:
    """The CLI's one error line (other stderr lines may be config warnings)."""
    lines = [line for line in text.strip().splitlines() if line.startswith("neoxt:")]
    assert len(lines) == 1, text
    return lines[0]

# A user's GPT-NeoX config for the tiny LLaMA of test_neox_import (GPT-NeoX key names and blocks).
LLAMA_YML = """\
{
  "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
  "seq_length": 32, "max_position_embeddings": 64,
  "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-6, "pos_emb": "rotary", "rotary_emb_base": 10000,
  "activation": "swiglu", "intermediate_size": 96,
  "use_bias_in_attn_linear": false, "use_bias_in_mlp": false, "use_bias_in_norms": false,
  "no_weight_tying": true, "model_parallel_size": 2, "pipe_parallel_size": 1,
  "optimizer": {"type": "Adam", "params": {"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "train_micro_batch_size_per_gpu": 4, "train_iters": 100,
  "bf16": {"enabled": true},
}
"""


def test_cli_neox_to_neoxt_to_neox_and_inspect(tmp_path, capsys):
    import neoxt

    hf = build_hf("llama")
    step = write_neox(hf_to_neox_shards(hf, "llama", 2), tmp_path / "neox", "pipeline", iteration=5)
    cfg = tmp_path / "llama.yml"
    cfg.write_text(LLAMA_YML)

    run_dir = tmp_path / "run"
    assert main(["convert", "neox-to-neoxt", "--input-dir", str(step), "--config", str(cfg), "--output-dir", str(run_dir)]) == 0
    assert (run_dir / "latest").read_text().strip() == "global_step5"
    assert (run_dir / "config.yml").is_file()

    model = neoxt.load_model(run_dir)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4

    back = tmp_path / "back"
    assert main(["convert", "neoxt-to-neox", "--checkpoint", str(run_dir), "--output-dir", str(back),
                 "--model-parallel-size", "2", "--pipeline-layout"]) == 0
    names = sorted(p.name for p in (back / "global_step5").iterdir())
    assert "layer_00-model_01-model_states.pt" in names and "layer_05-model_01-model_states.pt" in names
    assert "layer_06-model_00-model_states.pt" in names  # untied final_linear at L+4
    assert "mp_rank_01_model_states.pt" in names and "configs" in names
    capsys.readouterr()

    assert main(["convert", "inspect", "--json", str(back)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gpt-neox" and info["iteration"] == 5
    assert info["details"]["model_parallel_size"] == 2 and info["details"]["layout"] == "pipeline"
    assert info["num_params"] == sum(p.numel() for p in hf.parameters())

    # Defaults: the config copy written into the exported checkpoint's configs/, and <save dir>-neoxt.
    assert main(["convert", "neox-to-neoxt", "--input-dir", str(back)]) == 0
    again = tmp_path / "back-neoxt"
    a, b = neoxt.load_model(run_dir).state_dict(), neoxt.load_model(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    step = write_neox(hf_to_neox_shards(build_hf("llama"), "llama", 2), tmp_path / "neox", "sequential")
    (step / "mp_rank_01_model_states.pt").unlink()
    cfg = tmp_path / "llama.yml"
    cfg.write_text(LLAMA_YML)
    out = tmp_path / "out"
    rc = main(["convert", "neox-to-neoxt", "--input-dir", str(step), "--config", str(cfg), "--output-dir", str(out)])
    err = _error_line(capsys.readouterr().err)
    assert rc == 2 and "mp_rank_01_model_states.pt" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    # A config that does not match the checkpoint: named tensor, file, and the intermediate_size it implies.
    step2 = write_neox(hf_to_neox_shards(build_hf("llama"), "llama", 1), tmp_path / "neox2", "sequential")
    cfg.write_text(LLAMA_YML.replace('"intermediate_size": 96', '"intermediate_size": 128').replace('"model_parallel_size": 2', '"model_parallel_size": 1'))
    rc = main(["convert", "neox-to-neoxt", "--input-dir", str(step2), "--config", str(cfg), "--output-dir", str(out)])
    err = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert "mp_rank_00_model_states.pt" in err and "2.mlp.linear1.weight" in err and "intermediate_size 96" in err
    assert not out.exists()

    rc = main(["convert", "inspect", str(tmp_path / "nothing-here")])
    assert rc == 2 and "nothing-here" in _error_line(capsys.readouterr().err)
