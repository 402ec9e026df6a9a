"""The users' SFT recipe, as GPT-NeoX runs it: ``finetune: true`` + ``load`` + ``iteration`` +
``extra_save_iters: [0]`` (upstream ``megatron/checkpointing.py::load_checkpoint``: ``iteration``
picks ``global_step<iteration>`` under ``load``; ``finetune`` loads the module only and resets the
counter to 0)."""

from __future__ import annotations

import re

import pytest
import torch

from neoxt.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from neoxt.config import config_from_dict
from neoxt.errors import CheckpointError
from neoxt.train.loop import train


def _cfg(corpus_dataset, tmp_path, **extra) -> dict:
    tok, prefix = corpus_dataset
    d = {
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "train_iters": 30,
        "data_path": prefix, "split": "100,0,0", "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file,
        "log_interval": 1, "index_cache_dir": str(tmp_path / "cache"), "precision": "fp32", "seed": 3,
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}}, "lr_decay_style": "constant",
    }
    d.update(extra)
    return d


def _weights(step_dir):
    import neoxt

    return neoxt.load_model(step_dir).state_dict()


def test_sft_recipe_finetune_iteration_extra_save_zero_then_resume(tmp_path, corpus_dataset, capsys):
    base = tmp_path / "midtrain"
    train(config_from_dict(_cfg(corpus_dataset, tmp_path, save=str(base), checkpoint_factor=10,
                                extra_save_iters=[])), "", log=lambda m: None)
    assert {p.name for p in list_checkpoints(base)} >= {"global_step20", "global_step30"}
    capsys.readouterr()

    sft = _cfg(corpus_dataset, tmp_path, save=str(tmp_path / "sft"), load=str(base), finetune=True,
               iteration=20, train_iters=30, extra_save_iters=[0], checkpoint_factor=1000)
    lines: list[str] = []
    r = train(config_from_dict(sft), "", log=lines.append)
    out = capsys.readouterr().out
    assert lines[0].startswith(f"finetuning from weights in {base / 'global_step20'}"), lines[0]
    assert r.start_iteration == 0 and r.iteration == 30
    logged = [int(m.group(1)) for line in out.splitlines()
              if "lm_loss" in line and (m := re.search(r"iteration\s+(\d+)/\s*30", line))]
    assert logged == list(range(1, 31))
    assert [p.name for p in list_checkpoints(tmp_path / "sft")] == ["global_step0", "global_step30"]
    # global_step0 is the base model: step 20's weights, not step 30's.
    step0, w20, w30 = (_weights(p) for p in (tmp_path / "sft" / "global_step0", base / "global_step20",
                                                base / "global_step30"))
    assert all(torch.equal(step0[k], w20[k]) for k in w20)
    assert not all(torch.equal(step0[k], w30[k]) for k in w30)
    assert read_meta(tmp_path / "sft" / "global_step0")["iteration"] == 0

    # The unchanged command again: automatic resume from save wins over finetune/load/iteration.
    lines.clear()
    again = train(config_from_dict(sft), "", log=lines.append)
    assert lines[0].startswith(f"resuming from {tmp_path / 'sft' / 'global_step30'}")
    assert again.start_iteration == 30 and latest_checkpoint(tmp_path / "sft").name == "global_step30"

    missing = dict(sft, save=str(tmp_path / "sft99"), iteration=99)
    with pytest.raises(CheckpointError, match=r"global_step99: no such checkpoint .*global_step20"):
        train(config_from_dict(missing), "", log=lambda m: None)
    assert not (tmp_path / "sft99" / "global_step0").exists()


def test_plain_load_with_missing_iteration_names_the_directory(tmp_path, corpus_dataset):
    cfg = _cfg(corpus_dataset, tmp_path, save=str(tmp_path / "b"), load=str(tmp_path / "nothing"), iteration=7)
    with pytest.raises(CheckpointError, match="global_step7: no such checkpoint"):
        train(config_from_dict(cfg), "", log=lambda m: None)
