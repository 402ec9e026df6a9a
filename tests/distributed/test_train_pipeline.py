"""`neoxt train` with pipe_parallel_size 2 under torchrun (2 gloo processes) == 1 process, and resumes
(under the pipeline, and in one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_neoxt_train


def _records(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.distributed
def test_two_stage_pipeline_matches_one_process_and_resumes(tmp_path, corpus_dataset):
    tok, prefix = corpus_dataset

    def run(name: str, nproc: int, **extra) -> tuple[list[float], list[dict]]:
        cfg = {
            "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
            "max_position_embeddings": 64, "no_weight_tying": True,
            "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}}, "gradient_clipping": 1.0,
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_iters": 4,
            # EOD tokens carry no loss: micro-batches count different numbers of tokens, so the
            # pipeline's per-micro-batch losses must still add up to the global token mean.
            "eod_mask_loss": True,
            "data_path": prefix, "split": "90,10,0", "tokenizer_type": "HFTokenizer",
            "vocab_file": tok.vocab_file, "save": str(tmp_path / name), "checkpoint_factor": 4,
            "eval_interval": 2, "eval_iters": 1, "log_interval": 1, "seed": 3,
            "index_cache_dir": str(tmp_path / f"cache-{name}"),
            **extra,
        }
        run_neoxt_train(cfg, tmp_path / f"{name}.yml", nproc)
        metrics = _records(tmp_path / name, "metrics.jsonl")
        evals = [r for r in _records(tmp_path / name, "eval.jsonl") if "valid_loss" in r]
        return [r["loss"] for r in metrics], evals

    one, one_eval = run("one", 1)
    pp, pp_eval = run("pp", 2, pipe_parallel_size=2)
    assert len(one) == len(pp) == 4
    # Same global batch, same math: only float summation order differs (~1e-8 here). A mean of the
    # micro-batches' means instead of the global token mean is off by ~2e-6 with these masks.
    assert pp == pytest.approx(one, rel=5e-7)
    assert len(one_eval) == len(pp_eval) == 2
    assert [r["valid_loss"] for r in pp_eval] == pytest.approx([r["valid_loss"] for r in one_eval], rel=1e-5)
    assert [r["tokens"] for r in pp_eval] == [r["tokens"] for r in one_eval]
    assert one[-1] < one[0]  # it trains

    # Checkpoints of the pipeline (each rank saves its stage's keys): stop at 2, rerun, continue exactly.
    run("chain", 2, pipe_parallel_size=2, exit_interval=2)
    assert json.loads((tmp_path / "chain" / "heartbeat.json").read_text())["iteration"] == 2
    chained, _ = run("chain", 2, pipe_parallel_size=2, exit_interval=2)
    assert chained == pytest.approx(pp, rel=1e-6)

    # A pipelined checkpoint (stage-keyed weights, flattened optimizer state) resumes in one process.
    run("cross", 2, pipe_parallel_size=2, exit_interval=2)
    crossed, _ = run("cross", 1, exit_interval=2)
    assert crossed == pytest.approx(one, rel=5e-7)
