"""`neoxt train` with train_impl: dpo on 2 data-parallel processes (FSDP2, frozen reference sharded
like the policy) == 1 process on the same global batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import run_neoxt_train
from neoxt.data.indexed import IndexedDatasetWriter


def _write(prefix: Path, docs: list[tuple[list[int], list[int]]]) -> tuple[str, str]:
    with IndexedDatasetWriter(f"{prefix}_text_document", np.uint16) as t, \
            IndexedDatasetWriter(f"{prefix}_label_document", np.int32) as lab:
        for prompt, answer in docs:
            t.add_document(np.array(prompt + answer, dtype=np.uint16))
            lab.add_document(np.array([-100] * len(prompt) + answer, dtype=np.int32))
    return f"{prefix}_text_document", f"{prefix}_label_document"


@pytest.mark.slow
@pytest.mark.distributed
def test_dpo_two_data_parallel_processes_match_one(tmp_path, tiny_tokenizer_dir):
    rng = np.random.default_rng(0)
    pos, neg = [], []
    for _ in range(40):  # chosen answers count upwards, rejected ones repeat a token
        prompt = rng.integers(20, 60, int(rng.integers(3, 6))).tolist()
        start = int(rng.integers(100, 140))
        pos.append((prompt, list(range(start, start + 6))))
        neg.append((prompt, [start] * 6))
    p, n = _write(tmp_path / "pos", pos), _write(tmp_path / "neg", neg)

    def run(name: str, nproc: int, micro: int) -> list[float]:
        cfg = {
            "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
            "max_position_embeddings": 32, "pos_emb": "rotary",
            "optimizer": {"type": "Adam", "params": {"lr": 5.0e-3}}, "weight_decay": 0.0,
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2, "train_iters": 4,
            "dataset_impl": "pairwise", "pack_impl": "unpacked", "train_impl": "dpo", "dpo_beta": 0.5,
            "pos_train_data_paths": [p[0]], "neg_train_data_paths": [n[0]],
            "pos_train_label_data_paths": [p[1]], "neg_train_label_data_paths": [n[1]], "split": "100,0,0",
            "tokenizer_type": "HFTokenizer", "vocab_file": str(tiny_tokenizer_dir / "tokenizer.json"),
            "log_interval": 1, "seed": 5, "index_cache_dir": str(tmp_path / f"cache-{name}"),
            "save": str(tmp_path / name), "checkpoint_factor": 4,
        }
        run_neoxt_train(cfg, tmp_path / f"{name}.yml", nproc)
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one = run("one", 1, 2)
    two = run("two", 2, 1)
    assert len(one) == len(two) == 4
    assert one[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    assert one[-1] < 0.5 * one[0]  # it learns the preference
    # The same pairs split over two ranks: the ranks' gradients summed by FSDP, not by hand.
    assert two == pytest.approx(one, rel=1e-5)
