"""DPO (train_impl: dpo) on pairwise preference data through the real loader."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from trainkit import train_killed_after

from neoxt.config import config_from_dict
from neoxt.data.indexed import IndexedDatasetWriter
from neoxt.errors import ConfigError
from neoxt.train.loop import train


def _write(prefix, docs):
    with IndexedDatasetWriter(f"{prefix}_text_document", np.uint16) as t, \
            IndexedDatasetWriter(f"{prefix}_label_document", np.int32) as lab:
        for prompt, answer in docs:
            t.add_document(np.array(prompt + answer, dtype=np.uint16))
            lab.add_document(np.array([-100] * len(prompt) + answer, dtype=np.int32))
    return f"{prefix}_text_document", f"{prefix}_label_document"


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory, tiny_tokenizer_dir):
    """Chosen answers count upwards (7, 8, 9, ...), rejected ones repeat one token."""
    root = tmp_path_factory.mktemp("dpo")
    rng = np.random.default_rng(0)
    pos, neg = [], []
    for _ in range(40):
        prompt = rng.integers(20, 60, int(rng.integers(3, 6))).tolist()
        start = int(rng.integers(100, 140))
        pos.append((prompt, list(range(start, start + 6))))
        neg.append((prompt, [start] * 6))
    return {"pos": _write(root / "pos", pos), "neg": _write(root / "neg", neg), "root": root,
            "vocab_file": str(tiny_tokenizer_dir / "tokenizer.json")}


def _cfg(pref_data, tmp_path, **extra):
    return config_from_dict(_cfg_dict(pref_data, tmp_path, **extra))


def _cfg_dict(pref_data, tmp_path, **extra) -> dict:
    p, n = pref_data["pos"], pref_data["neg"]
    d = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "max_position_embeddings": 32, "pos_emb": "rotary",
        "optimizer": {"type": "Adam", "params": {"lr": 5.0e-3}}, "weight_decay": 0.0,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_iters": 8,
        "dataset_impl": "pairwise", "pack_impl": "unpacked", "train_impl": "dpo", "dpo_beta": 0.5,
        "pos_train_data_paths": [p[0]], "neg_train_data_paths": [n[0]],
        "pos_train_label_data_paths": [p[1]], "neg_train_label_data_paths": [n[1]],
        "pos_valid_data_paths": [p[0]], "neg_valid_data_paths": [n[0]],
        "pos_valid_label_data_paths": [p[1]], "neg_valid_label_data_paths": [n[1]],
        "pos_test_data_paths": [p[0]], "neg_test_data_paths": [n[0]],
        "pos_test_label_data_paths": [p[1]], "neg_test_label_data_paths": [n[1]],
        "tokenizer_type": "HFTokenizer", "vocab_file": pref_data["vocab_file"],
        "eval_interval": 4, "eval_iters": 1, "log_interval": 1, "seed": 5,
        "index_cache_dir": str(pref_data["root"] / "cache"),
        "save": str(tmp_path / "run"), "checkpoint_factor": 4,
    }
    d.update(extra)
    return d


def _base_model(tmp_path, pref_data):
    """A starting model ('the SFT model') saved as a neoxt checkpoint for finetune + load."""
    cfg = _cfg(pref_data, tmp_path, save=str(tmp_path / "sft"), train_impl="normal", train_iters=1,
               dataset_impl="gpt2", pack_impl="packed",
               train_data_paths=[pref_data["pos"][0]], valid_data_paths=[pref_data["pos"][0]],
               test_data_paths=[pref_data["pos"][0]])
    train(cfg, None, log=lambda m: None)
    return tmp_path / "sft"


def test_dpo_starts_at_log2_learns_the_preference_and_resumes_exactly(tmp_path, pref_data):
    sft = _base_model(tmp_path, pref_data)
    cfg = _cfg(pref_data, tmp_path, load=str(sft), finetune=True)
    ref = train(replace(cfg, checkpoint=replace(cfg.checkpoint, save=str(tmp_path / "straight"))), None,
                log=lambda m: None)
    # Policy == reference at the first step: every pair's loss is -logsigmoid(0) = log 2.
    assert ref.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(x) for x in ref.losses)
    assert sum(ref.losses[-3:]) / 3 < 0.6, ref.losses

    first = train_killed_after(6, cfg, None, log=lambda m: None)
    lines = []
    second = train(cfg, None, log=lines.append)
    assert lines[0].startswith("resuming from") and second.start_iteration == 4
    assert first.losses[:4] + second.losses == ref.losses


def test_dpo_trains_a_moe_model_end_to_end(tmp_path, pref_data):
    """The reported loss stays the DPO loss (log 2 at step 1: a fresh run's reference is the starting
    model) while the policy's MoE auxiliary losses join the backward and reach metrics.jsonl."""
    moe = {"moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk", "moe_aux_loss_coeff": 0.01,
           "moe_z_loss_coeff": 0.001}
    # `neoxt train` runs this same `train` (in-process here: a subprocess would spend ~10 s importing torch)
    run = train(_cfg(pref_data, tmp_path, train_iters=3, eval_interval=3, checkpoint_factor=3, **moe), None,
                log=lambda m: None)
    assert len(run.losses) == 3
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for r in records:
        assert math.isfinite(r["loss"]) and r["moe_aux_loss"] >= 0.9 and r["moe_z_loss"] > 0
    assert (tmp_path / "run" / "eval.jsonl").exists()


def test_dpo_reference_free_and_bad_setups(tmp_path, pref_data):
    r = train(_cfg(pref_data, tmp_path, dpo_reference_free=True, train_iters=2), None, log=lambda m: None)
    assert all(math.isfinite(x) for x in r.losses)
    with pytest.raises(ConfigError, match="pairwise"):
        train(_cfg(pref_data, tmp_path / "x", dataset_impl="gpt2", pack_impl="packed",
                   train_data_paths=[pref_data["pos"][0]], valid_data_paths=[pref_data["pos"][0]],
                   test_data_paths=[pref_data["pos"][0]]), None, log=lambda m: None)


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    """Desirable answers (reward +1) count upwards, undesirable ones (reward -1) repeat one token."""
    root = tmp_path_factory.mktemp("kto")
    rng = np.random.default_rng(1)
    prefix = root / "kto"
    with IndexedDatasetWriter(f"{prefix}_text_document", np.uint16) as t, \
            IndexedDatasetWriter(f"{prefix}_label_document", np.int32) as lab, \
            IndexedDatasetWriter(f"{prefix}_reward_document", np.float32) as rew:
        for i in range(60):
            prompt = rng.integers(20, 60, int(rng.integers(3, 6))).tolist()
            start = int(rng.integers(100, 140))
            good = i % 2 == 0
            answer = list(range(start, start + 6)) if good else [start] * 6
            t.add_document(np.array(prompt + answer, dtype=np.uint16))
            lab.add_document(np.array([-100] * len(prompt) + answer, dtype=np.int32))
            rew.add_document(np.array([1.0 if good else -1.0], dtype=np.float32))
    return {"prefix": str(prefix), "root": root}


def test_kto_starts_at_half_and_learns(tmp_path, pref_data, kto_data):
    sft = _base_model(tmp_path, pref_data)
    p = kto_data["prefix"]
    paths = {f"{s}_data_paths": [f"{p}_text_document"] for s in ("train", "valid", "test")}
    paths.update({f"{s}_label_data_paths": [f"{p}_label_document"] for s in ("train", "valid", "test")})
    paths.update({f"{s}_reward_data_paths": [f"{p}_reward_document"] for s in ("train", "valid", "test")})
    cfg = _cfg(pref_data, tmp_path, train_impl="kto", kto_beta=1.0, dataset_impl="gpt2", pack_impl="unpacked",
               load=str(sft), finetune=True, train_iters=10, save=str(tmp_path / "kto"),
               index_cache_dir=str(kto_data["root"] / "cache"), **paths)
    r = train(cfg, None, log=lambda m: None)
    # Policy == reference: every sequence scores 0.5 * w * (1 - sigmoid(0)) per half -> 0.5 in total.
    assert r.losses[0] == pytest.approx(0.5, abs=1e-6)
    assert all(math.isfinite(x) for x in r.losses)
    assert sum(r.losses[-3:]) / 3 < 0.49, r.losses
