"""The iteration log line carries GPT-NeoX's labels, so the users' greps and parsers read neoxt logs."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_neoxt_train
from neoxt.train.metrics import MetricsLogger, StepStats

SEED_LOSS = re.compile(r"lm_loss:\s*([0-9.E+-]+)")  # the users' seed script's parse


def test_grep_and_seed_regex_read_a_real_training_log(tmp_path, corpus_dataset):
    tok, prefix = corpus_dataset
    run = tmp_path / "run"
    cfg = {
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "train_iters": 6,
        "data_path": prefix, "split": "90,10,0", "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file,
        "save": str(run), "checkpoint_factor": 6, "eval_interval": 3, "eval_iters": 1, "log_interval": 2,
        "index_cache_dir": str(tmp_path / "cache"),
    }
    out = run_neoxt_train(cfg, tmp_path / "tiny.yml").stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4, 6]

    grepped = [line for line in out.splitlines() if re.search("iteration.*lm_loss", line)]
    train_lines = [line for line in grepped if "validation" not in line]
    assert [int(re.search(r"iteration\s+(\d+)/", line).group(1)) for line in train_lines] == [2, 4, 6]
    losses = [float(m.group(1)) for line in out.splitlines() if (m := SEED_LOSS.search(line))]
    assert losses == pytest.approx([r["loss"] for r in records], rel=1e-6)
    for label in ("learning rate: ", "number of nan iterations:   0", "number of skipped iterations:   0",
                  "elapsed time per iteration (ms): "):
        assert label in train_lines[0]
    assert any("validation results at iteration 3 | lm_loss value: " in line for line in grepped)


def test_nan_and_skipped_counts_are_per_log_interval(capsys):
    log = MetricsLogger(run_dir=None, train_iters=4, flops_per_token=1.0, peak_tflops=None, log_interval=2,
                        nan_count=5, skipped_count=5)  # a resumed run's totals
    for it, bad in ((1, True), (2, False), (3, False), (4, False)):
        log.record(StepStats(it, float("nan") if bad else 2.0, 1e-3, 1.0, 10, 0.01, skipped=bad), nan=bad)
    first, second = capsys.readouterr().out.splitlines()
    assert "number of nan iterations:   1" in first and "number of skipped iterations:   1" in first
    assert "number of nan iterations:   0" in second and log.nan_count == 6
