"""`neoxt train` with train_impl: rm and train_impl: reinforce on 2 data-parallel processes (FSDP2;
REINFORCE samples with the sharded policy and keeps a sharded frozen reference) == 1 process on the
same global batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, run_neoxt_train
from neoxt.data.indexed import IndexedDatasetWriter

HERE = Path(__file__).resolve().parent


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _common(tmp_path: Path, tiny_tokenizer_dir: Path, name: str, micro: int) -> dict:
    return {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 24,
        "max_position_embeddings": 32, "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}},
        "weight_decay": 0.0, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2,
        "train_iters": 4, "tokenizer_type": "HFTokenizer", "vocab_file": str(tiny_tokenizer_dir / "tokenizer.json"),
        "log_interval": 1, "seed": 5, "eval_iters": 0, "index_cache_dir": str(tmp_path / f"cache-{name}"),
        "save": str(tmp_path / name), "checkpoint_factor": 4,
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_reinforce_two_data_parallel_processes_match_one(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE.parent / "train"), os.environ.get("PYTHONPATH", "")]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in sorted(set(CORPUS))))

    def run(name: str, nproc: int, micro: int) -> list[dict]:
        cfg = _common(tmp_path, tiny_tokenizer_dir, name, micro)
        cfg.update({"train_impl": "reinforce", "reinforce_reward": "toy_rewards:mean_token_id",
                    "reinforce_prompts": str(prompts), "reinforce_samples": 3, "reinforce_max_new_tokens": 6,
                    "reinforce_leave_one_out": True, "kl_impl": "mse", "kl_div_beta": 0.1})
        run_neoxt_train(cfg, tmp_path / f"{name}.yml", nproc)
        return _metrics(tmp_path / name)

    one, two = run("one", 1, 2), run("two", 2, 1)
    assert len(one) == len(two) == 4
    for key in ("loss", "reward", "kl", "logp", "completion_tokens"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-7), key
    assert one[0]["kl"] == 0.0 and one[-1]["kl"] > 0.0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["dp", "tp"])
def test_rm_two_processes_match_one(tmp_path, tiny_tokenizer_dir, layout):
    """Two data-parallel ranks, or two tensor-parallel ranks (the one-output head stays whole), from
    the same starting weights (a TP run initialises its shards differently from one process)."""
    rng = np.random.default_rng(0)
    paths = {}
    for side, token in (("pos", 150), ("neg", 151)):
        rng = np.random.default_rng(0)
        with IndexedDatasetWriter(f"{tmp_path / side}_text_document", np.uint16) as t, \
                IndexedDatasetWriter(f"{tmp_path / side}_label_document", np.int32) as lab:
            for _ in range(32):
                prompt, answer = rng.integers(20, 60, 4).tolist(), rng.integers(100, 140, 5).tolist()
                t.add_document(np.array(prompt + answer + [token, 0], dtype=np.uint16))
                lab.add_document(np.array([-100] * 4 + answer + [token, 0], dtype=np.int32))
        paths[f"{side}_train_data_paths"] = [f"{tmp_path / side}_text_document"]
        paths[f"{side}_train_label_data_paths"] = [f"{tmp_path / side}_label_document"]

    def run(name: str, nproc: int, micro: int) -> list[dict]:
        cfg = _common(tmp_path, tiny_tokenizer_dir, name, micro)
        cfg.update({"train_impl": "rm", "dataset_impl": "pairwise", "pack_impl": "unpacked", "split": "100,0,0",
                    "make_vocab_size_divisible_by": 1, **paths})  # the same vocabulary rows under TP 2
        if nproc > 1 and layout == "tp":
            cfg.update({"model_parallel_size": 2, "train_micro_batch_size_per_gpu": 2})
        if name != "base":
            cfg.update({"load": str(tmp_path / "base"), "finetune": True})
        else:
            cfg.update({"train_iters": 1, "checkpoint_factor": 1})
        run_neoxt_train(cfg, tmp_path / f"{name}.yml", nproc)
        return _metrics(tmp_path / name)

    run("base", 1, 2)
    one, two = run("one", 1, 2), run("two", 2, 1)
    assert len(one) == len(two) == 4
    for key in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=2e-5), key
