"""Bad input to the HF converters: one-line errors naming the file and tensor, nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hfkit import hf_model, run_cli, save_hf_dir

import neoxt
from neoxt.errors import CheckpointError, ConversionError


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    return save_hf_dir(hf_model("llama"), tiny_tokenizer_dir, tmp_path_factory.mktemp("src") / "hf")


def _copy(src, tmp_path):
    dst = tmp_path / "input"
    shutil.copytree(src, dst)
    return dst


def _fails(argv, capsys, *fragments):
    out_path = argv[argv.index("--output-dir") + 1]
    assert run_cli(argv) == 2
    message = capsys.readouterr().out.strip()
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not Path(out_path).exists()
    assert not [p for p in Path(out_path).parent.iterdir() if ".tmp." in p.name]  # no temp dir left either
    return message


def test_missing_shard(llama_dir, tmp_path, capsys):
    src = _copy(llama_dir, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (src / victim).unlink()
    _fails(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(tmp_path / "out")], capsys,
           "model.safetensors.index.json", victim, "missing", "tensor model.")


def test_shape_mismatch_names_the_tensor(llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _copy(llama_dir, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(16, 64)  # should be [32, 64] (2 kv heads of 16)
    save_file(tensors, shard, metadata={"format": "pt"})
    _fails(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(tmp_path / "out")], capsys,
           str(src), name, "[16, 64]", "[32, 64]")


def test_missing_and_unexpected_tensors(llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _copy(llama_dir, tmp_path)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.0.mlp.gate_proj.weight"
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.extra.weight"] = tensors.pop(name)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))
    _fails(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(tmp_path / "out")], capsys,
           "missing tensor " + name)


def test_unknown_architecture(llama_dir, tmp_path, capsys):
    src = _copy(llama_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["JambaForCausalLM"], "jamba"
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(tmp_path / "out")], capsys,
           str(src / "config.json"), "JambaForCausalLM", "LlamaForCausalLM")
    with pytest.raises(ConversionError, match="JambaForCausalLM"):
        neoxt.load_model(src)


def test_unsupported_rope_scaling_is_refused(llama_dir, tmp_path, capsys):
    src = _copy(llama_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(tmp_path / "out")], capsys,
           "rope_type 'dynamic'")


def test_existing_output_is_not_touched(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(llama_dir), "--output-dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_checkpoint_that_does_not_match_its_config(llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(llama_dir), "--output-dir", str(run)]) == 0
    cfg_path = run / "global_step0" / "config.yml"
    cfg_path.write_text(cfg_path.read_text().replace("intermediate_size: 96", "intermediate_size: 128"))
    msg = _fails(["convert", "neoxt-to-hf", "--checkpoint", str(run), "--output-dir", str(tmp_path / "hf")],
                 capsys, "global_step0", "model.layers.0.mlp.", "[96, 64]", "[128, 64]")
    assert "shape" in msg
    with pytest.raises(CheckpointError, match="intermediate|config.yml"):
        neoxt.load_model(run)
    _fails(["convert", "neoxt-to-hf", "--checkpoint", str(tmp_path / "nowhere"), "--output-dir",
            str(tmp_path / "hf2")], capsys, "nowhere")


def test_config_without_an_hf_architecture(tmp_path, capsys):
    """A model HF cannot represent (GPT-J tied norms) is refused before anything is written."""
    from neoxt.checkpoint import save_checkpoint
    from neoxt.config import config_to_yaml
    from neoxt.config.schema import DataConfig, RunConfig
    from neoxt.model import Transformer, preset

    cfg = preset("gpt-neox-tiny", gpt_j_tied=True)
    text = config_to_yaml(RunConfig(model=cfg, data=DataConfig(seq_length=512)))
    save_checkpoint(tmp_path / "run", 3, {"model": Transformer(cfg).state_dict()}, text)
    _fails(["convert", "neoxt-to-hf", "--checkpoint", str(tmp_path / "run"), "--output-dir", str(tmp_path / "hf")],
           capsys, "GPTNeoXForCausalLM", "gpt_j_tied")


def test_pythia_era_gpt_neox_checkpoint(tmp_path, tiny_tokenizer_dir):
    """Older HF GPTNeoX dirs: pytorch_model.bin, `embed_out`, attention buffers, rotary_pct in config.json."""
    hf = hf_model("gpt_neox")
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v.clone() for k, v in hf.state_dict().items()}
    for i in range(hf.config.num_hidden_layers):
        sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        sd[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    src = tmp_path / "pythia"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    cfg = hf.config.to_dict()
    cfg.pop("rope_parameters")
    cfg.update(rotary_pct=0.25, rotary_emb_base=10000, architectures=["GPTNeoXForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    assert run_cli(["convert", "hf-to-neoxt", "--hf-model", str(src), "--output-dir", str(tmp_path / "out")]) == 0
    tokens = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        assert (neoxt.load_model(tmp_path / "out")(tokens) - hf(tokens).logits).abs().max() <= 1e-4
    sd["gpt_neox.layers.0.attention.rogue.weight"] = torch.zeros(2)
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="unexpected tensor gpt_neox.layers.0.attention.rogue.weight"):
        neoxt.load_model(src)


def test_missing_local_dir_and_unreachable_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached: offline lookup must fail
    _fails(["convert", "hf-to-neoxt", "--hf-model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o1")],
           capsys, "nope: no such directory")
    _fails(["convert", "hf-to-neoxt", "--hf-model", "no-such-org/no-such-model", "--output-dir",
            str(tmp_path / "o2")], capsys, "no-such-org/no-such-model", "not downloadable from the Hub")
