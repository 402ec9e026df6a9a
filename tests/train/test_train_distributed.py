"""`neoxt train` under torchrun: 2 gloo processes (FSDP2 data parallel, or tensor parallel) == 1 process."""

from __future__ import annotations

import json

import pytest

from conftest import run_neoxt_train


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_data_parallel_matches_one_process(tmp_path, corpus_dataset):
    tok, prefix = corpus_dataset

    def run(name: str, nproc: int, micro: int, **extra) -> list[float]:
        cfg = {
            "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
            "max_position_embeddings": 64, "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}},
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2, "train_iters": 4,
            "data_path": prefix, "split": "90,10,0", "tokenizer_type": "HFTokenizer",
            "vocab_file": tok.vocab_file, "save": str(tmp_path / name), "checkpoint_factor": 4,
            "eval_interval": 2, "eval_iters": 1, "log_interval": 1, "seed": 3,
            "index_cache_dir": str(tmp_path / f"cache-{name}"),
            **extra,
        }
        run_neoxt_train(cfg, tmp_path / f"{name}.yml", nproc)
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records]

    one = run("one", 1, 4)
    two = run("two", 2, 2)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4)

    # Tensor parallel over the 2 ranks (one data-parallel rank reading the whole micro-batch).
    # (GPT-NeoX pads the vocabulary to a multiple of divisor x TP size: 64 x 2 keeps 1 process's 384 rows.)
    tp = run("tp", 2, 4, model_parallel_size=2, make_vocab_size_divisible_by=64)
    assert tp == pytest.approx(one, rel=1e-4)

    # FSDP2 checkpoints: stop at 2 (exit_interval), rerun the same command, continue exactly.
    run("chain", 2, 2, exit_interval=2)
    assert json.loads((tmp_path / "chain" / "heartbeat.json").read_text())["iteration"] == 2
    chained = run("chain", 2, 2, exit_interval=2)
    assert chained == two

    # Background checkpoint writes under FSDP2 (their own gloo group): the same chain, the same losses.
    run("async", 2, 2, exit_interval=2, async_save=True)
    assert (tmp_path / "async" / "global_step2").is_dir() and not list((tmp_path / "async").glob("*.tmp*"))
    assert run("async", 2, 2, exit_interval=2, async_save=True) == two
