"""`neoxt convert inspect`: format, iteration, tensors and parameter count of all three formats."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch
from test_neox_import import VOCAB, build_hf, hf_to_neox_shards, model_config, write_neox

from neoxt.config.schema import DataConfig, RunConfig
from neoxt.convert import neox
from neoxt.convert.commands import run_inspect as run
from neoxt.convert.inspect import format_table, inspect_checkpoint
from neoxt.errors import CheckpointError


def test_inspect_gpt_neox_merges_tp_shards(tmp_path):
    hf = build_hf("llama")
    tp1 = hf_to_neox_shards(hf, "llama", 1)[0]
    step = write_neox(hf_to_neox_shards(hf, "llama", 2), tmp_path / "neox", "pipeline", iteration=42)
    for path in (step, tmp_path / "neox"):  # the step dir, or the save dir with `latest`
        info = inspect_checkpoint(path)
        assert info.format == "gpt-neox" and info.iteration == 42
        assert info.details["layout"] == "pipeline" and info.details["model_parallel_size"] == 2
        shapes = {t.name: t.shape for t in info.tensors}
        assert shapes == {k: tuple(v.shape) for k, v in tp1.items()}
        assert info.num_params == sum(p.numel() for p in hf.parameters())


def test_inspect_gpt_neox_sequential_skips_derived_buffers(tmp_path):
    hf = build_hf("gptneox")
    step = write_neox(hf_to_neox_shards(hf, "gptneox", 2), tmp_path / "neox", "sequential", iteration=3)
    info = inspect_checkpoint(step)
    assert info.details["layout"] == "sequential" and info.iteration == 3
    assert not any("inv_freq" in t.name for t in info.tensors)
    assert info.details["derived_buffers_not_counted"] == 2
    assert info.num_params == sum(p.numel() for p in hf.parameters())
    assert {t.dtype for t in info.tensors} == {"float32"}


def test_inspect_hf_dir(tmp_path):
    hf = build_hf("olmo3")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    info = inspect_checkpoint(tmp_path / "hf")
    assert info.format == "hf" and info.iteration is None
    assert info.details["architectures"] == ["Olmo3ForCausalLM"]
    sd = hf.state_dict()
    assert {t.name: t.shape for t in info.tensors} == {k: tuple(v.shape) for k, v in sd.items()}
    assert {t.dtype for t in info.tensors} == {"bfloat16"}
    assert info.num_params == sum(v.numel() for v in sd.values())


def test_inspect_neoxt_checkpoint_and_json(tmp_path, capsys):
    hf = build_hf("gptneox")
    step = write_neox(hf_to_neox_shards(hf, "gptneox", 1), tmp_path / "neox", "sequential", iteration=9)
    run_cfg = RunConfig(model=model_config("gptneox"), data=DataConfig(seq_length=32))
    ckpt = neox.import_neox(step, run_cfg, tmp_path / "run")
    for path in (ckpt, tmp_path / "run"):
        info = inspect_checkpoint(path)
        assert info.format == "neoxt" and info.iteration == 9
        assert info.details["source_format"] == "gpt-neox-sequential"
        assert info.num_params == sum(p.numel() for p in hf.parameters())
        assert ("layers.1.attn.q.weight", (64, 64), "float32") in {(t.name, t.shape, t.dtype) for t in info.tensors}

    assert run(argparse.Namespace(path=str(tmp_path / "run"), json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "neoxt" and data["iteration"] == 9
    assert data["num_params"] == sum(math.prod(t["shape"]) for t in data["tensors"])
    assert {"name": "embed.weight", "shape": [128, 64], "dtype": "float32"} in data["tensors"]

    assert run(argparse.Namespace(path=str(ckpt), json=False)) == 0
    text = capsys.readouterr().out
    assert re.search(r"^format: +neoxt$", text, re.M) and "layers.0.mlp.up.weight" in text and "256x64" in text


def test_inspect_rejects_unknown_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as err:
        inspect_checkpoint(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(CheckpointError):
        inspect_checkpoint(tmp_path / "missing")
    assert "parameters:" in format_table(inspect_checkpoint(write_neox(hf_to_neox_shards(build_hf("llama"), "llama", 1), tmp_path / "n", "pipeline")))


def test_inspect_single_files(tmp_path):
    hf = build_hf("llama")
    hf.save_pretrained(tmp_path / "hf")
    info = inspect_checkpoint(tmp_path / "hf" / "model.safetensors")
    assert info.format == "safetensors-file"
    assert {t.name: t.shape for t in info.tensors} == {k: tuple(v.shape) for k, v in hf.state_dict().items()}

    step = write_neox(hf_to_neox_shards(hf, "llama", 2), tmp_path / "neox", "sequential", iteration=8)
    info = inspect_checkpoint(step / "mp_rank_01_model_states.pt")
    assert info.format == "torch-file" and info.iteration == 8
    shapes = {t.name: t.shape for t in info.tensors}
    assert shapes["module.sequential.0.word_embeddings.weight"] == (VOCAB // 2, 64)
    assert shapes["module.sequential.2.mlp.linear2.weight"] == (64, 48)


def test_inspect_neoxt_model_summary(tmp_path):
    step = write_neox(hf_to_neox_shards(build_hf("olmo3"), "olmo3", 1), tmp_path / "neox", "pipeline")
    run_cfg = RunConfig(model=model_config("olmo3"), data=DataConfig(seq_length=32))
    info = inspect_checkpoint(neox.import_neox(step, run_cfg, tmp_path / "run"))
    summary = info.details["model"]
    assert "layers=2" in summary and "norm=rmsnorm/olmo3" in summary and "sliding=1x4" in summary
    assert [t.name for t in info.tensors][:2] == ["embed.weight", "final_norm.weight"]
