"""A hybrid stack (attention + Mamba-1 + Mamba-2 layers from attention_config) trains with
`neoxt train` on the demo corpus: its loss falls, and a run stopped and resumed gives bit-identical
losses to one that was not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from trainkit import PatternSource, tiny_config, train_killed_after, with_checkpoint

from conftest import REPO, run_neoxt_train
from neoxt.train.loop import train
from neoxt.train.setup import TrainData

HYBRID = ("mamba", "global", "mamba2")


def _hybrid(cfg):
    model = replace(cfg.model, num_layers=3, attention_types=HYBRID, mamba_headdim=16, mamba_d_state=8,
                    mamba_chunk_size=8)
    return replace(cfg, model=model)


def test_hybrid_exact_resume_in_process(tmp_path):
    """8 steps straight == 5 steps (checkpoint at 4, then 'killed') + resume to 8, Mamba state included."""
    straight = with_checkpoint(_hybrid(tiny_config(save=tmp_path / "a", train_iters=8)), checkpoint_factor=4)
    ref = train(straight, "", data=TrainData(PatternSource(seed=3), PatternSource(seed=9)), log=lambda m: None)
    cfg = with_checkpoint(straight, save=str(tmp_path / "b"))
    first = train_killed_after(5, cfg, "", data=TrainData(PatternSource(seed=3), PatternSource(seed=9)),
                               log=lambda m: None)
    second = train(cfg, "", data=TrainData(PatternSource(seed=3), PatternSource(seed=9)), log=lambda m: None)
    assert first.iteration == 5 and second.start_iteration == 4
    assert first.losses[:4] + second.losses == ref.losses  # exact float equality


def _demo_run(tmp_path: Path, save: Path, **extra) -> list[dict]:
    """`neoxt train configs/demo.yml --set ...` with a small hybrid model; the run's metrics records."""
    import yaml

    from neoxt.train.demo import prepare_data

    dataset, vocab = prepare_data(tmp_path / "data")
    overrides = {
        "data_path": dataset, "vocab_file": vocab, "split": "949,50,1", "save": str(save),
        "index_cache_dir": str(tmp_path / "data" / "cache"),
        "num_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
        "attention_config": [[list(HYBRID), 1]], "mamba_headdim": 32, "mamba_chunk_size": 32,
        "seq_length": 64, "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 4,
        "train_iters": 24, "lr_decay_iters": 24, "checkpoint_factor": 12, "log_interval": 1,
        "eval_interval": 1000, **extra,
    }
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "neoxt.cli", "train", str(REPO / "configs" / "demo.yml"), *sets],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_hybrid_trains_and_resumes_with_neoxt_train_on_the_demo_corpus(tmp_path):
    straight = _demo_run(tmp_path, tmp_path / "straight")
    losses = [r["loss"] for r in straight]
    assert [r["iteration"] for r in straight] == list(range(1, 25))
    print("hybrid demo-corpus losses:", [round(v, 3) for v in losses])
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses  # the loss falls
    # stopped at 12 (exit_interval saves and exits), then the same command resumes to 24
    _demo_run(tmp_path, tmp_path / "resumed", exit_interval=12)
    resumed = _demo_run(tmp_path, tmp_path / "resumed", exit_interval=12)
    assert [r["loss"] for r in resumed] == losses  # bit-identical to the uninterrupted run


@pytest.mark.slow
@pytest.mark.distributed
def test_hybrid_fsdp2_two_processes_match_one_and_tp_is_refused(tmp_path, corpus_dataset):
    """Mamba layers under FSDP2 data parallel (2 gloo processes) give the 1-process losses; tensor
    parallelism is refused in one line naming the key."""
    tok, prefix = corpus_dataset

    def config(name: str, micro: int, **extra) -> dict:
        return {
            "num_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
            "attention_config": [[list(HYBRID), 1]], "mamba_headdim": 16, "mamba_chunk_size": 8,
            "max_position_embeddings": 64, "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}},
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2, "train_iters": 4,
            "data_path": prefix, "split": "90,10,0", "tokenizer_type": "HFTokenizer",
            "vocab_file": tok.vocab_file, "save": str(tmp_path / name), "checkpoint_factor": 4,
            "eval_interval": 1000, "log_interval": 1, "seed": 3, "index_cache_dir": str(tmp_path / f"cache-{name}"),
            **extra,
        }

    def run(name: str, nproc: int, micro: int, **extra) -> list[float]:
        run_neoxt_train(config(name, micro, **extra), tmp_path / f"{name}.yml", nproc)
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one = run("one", 1, 4)
    two = run("two", 2, 2)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4)

    import yaml

    (tmp_path / "tp.yml").write_text(yaml.safe_dump(config("tp", 4, model_parallel_size=2)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "neoxt.cli", "train", str(tmp_path / "tp.yml")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "tensor parallelism is not supported for Mamba layers" in out.stdout + out.stderr
