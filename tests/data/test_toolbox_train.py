"""Short ``neoxt train`` runs on what the toolbox writes: upstream's merged file and the masked dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_neoxt_train

FIX = Path(__file__).parent / "fixtures"
TOKENIZER = Path(__file__).resolve().parents[2] / "src" / "neoxt" / "data" / "corpus" / "tokenizer.json"


def _train(tmp_path, name: str, **data) -> list[float]:
    cfg = {
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 64, "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}},
        "train_micro_batch_size_per_gpu": 2, "train_iters": 3, "tokenizer_type": "HFTokenizer",
        "vocab_file": str(TOKENIZER), "save": str(tmp_path / name), "checkpoint_factor": 3,
        "eval_interval": 100, "eval_iters": 0, "log_interval": 1, "seed": 3,
        "index_cache_dir": str(tmp_path / f"cache-{name}"), **data,
    }
    run_neoxt_train(cfg, tmp_path / f"{name}.yml")
    return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_on_upstream_merged_and_masked_datasets(tmp_path):
    merged = str(FIX / "upstream_merge" / "merged")
    losses = _train(tmp_path, "merged", train_data_paths=[merged], valid_data_paths=[merged],
                    test_data_paths=[merged])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    text, label = (str(FIX / "upstream_mask" / f"masked_eod_{k}_document") for k in ("text", "label"))
    losses = _train(tmp_path, "masked", train_data_paths=[text], train_label_data_paths=[label],
                    valid_data_paths=[text], test_data_paths=[text])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
