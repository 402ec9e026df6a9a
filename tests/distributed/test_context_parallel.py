"""Context parallelism (``context_parallel_size``): the head-tail split, the masks over sequence
positions, the refusals, and 2 / 4 gloo processes giving the one-process loss and gradients — the
ring for causal layers, all-gathered K/V for sliding-window layers and document masks, and with
tensor parallelism — down to a `neoxt train` run whose loss curve and checkpoint match one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from neoxt.config.schema import ParallelismConfig, RunConfig
from neoxt.distributed.context_parallel import SequenceSplit, check_context_parallel, shard_batch
from neoxt.distributed.mesh import MeshShape, mesh_shape
from neoxt.errors import ConfigError
from neoxt.model.attention import build_mask

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from launchkit import metrics_losses, run_neoxt, write_train_config  # noqa: E402

pytestmark = pytest.mark.distributed


def test_head_tail_split_gives_each_rank_an_early_and_a_late_chunk():
    seq = torch.arange(8)[None]
    assert SequenceSplit(0, 2, None).shard(seq).tolist() == [[0, 1, 6, 7]]
    assert SequenceSplit(1, 2, None).shard(seq).tolist() == [[2, 3, 4, 5]]
    q, k = SequenceSplit(1, 2, None).slots(4, torch.device("cpu"))
    assert q.tolist() == [2, 3, 4, 5] and k.tolist() == [0, 1, 6, 7, 2, 3, 4, 5]  # K/V in all-gather order
    with pytest.raises(ValueError, match="does not split into 2 x 2"):
        SequenceSplit(0, 2, None).shard(torch.arange(6)[None])


def test_masks_over_positions_equal_the_rows_of_the_whole_sequence_mask():
    """Rank 1 of 2 holds positions 4..11 of 16: its mask rows (window 3, two documents) are those rows
    of the one-process mask, its columns the keys in all-gathered order."""
    split = SequenceSplit(1, 2, None)
    doc = torch.tensor([[0] * 6 + [1] * 10])
    full_doc = (doc[:, None, :, None] == doc[:, None, None, :])
    whole = build_mask(16, 16, 3, None, full_doc, torch.device("cpu"))
    local = shard_batch({"tokens": torch.zeros(1, 16, dtype=torch.long), "attention_mask": full_doc}, split)
    q, k = split.slots(8, torch.device("cpu"))
    got = build_mask(8, 16, 3, None, local["attention_mask"], torch.device("cpu"), (q, k))
    assert torch.equal(got, whole[:, :, q][:, :, :, k])
    assert build_mask(8, 16, None, None, None, torch.device("cpu"), (q, k)) is None  # causal only: the ring


def test_shard_batch_splits_every_sequence_tensor_and_adds_positions():
    b = {"tokens": torch.arange(8)[None], "labels": torch.arange(1, 9)[None], "loss_mask": torch.ones(1, 8)}
    out = shard_batch(b, SequenceSplit(0, 2, None))
    assert out["tokens"].tolist() == [[0, 1, 6, 7]] and out["labels"].tolist() == [[1, 2, 7, 8]]
    assert out["position_ids"].tolist() == [[0, 1, 6, 7]] and out["loss_mask"].shape == (1, 4)
    with pytest.raises(ValueError, match="'ref'"):
        shard_batch({**b, "ref": torch.zeros(1, 8)}, SequenceSplit(0, 2, None))


def test_mesh_takes_cp_out_of_data_parallel():
    assert mesh_shape(ParallelismConfig(context_parallel_size=2), 8) == MeshShape(1, 1, 4, 1, cp=2)
    assert mesh_shape(ParallelismConfig(context_parallel_size=2, model_parallel_size=2), 8).dp == 2
    with pytest.raises(ConfigError, match="context_parallel_size=3 does not divide"):
        mesh_shape(ParallelismConfig(context_parallel_size=3), 8)
    with pytest.raises(ConfigError, match="moe_expert_parallel_size > 1 with context_parallel_size"):
        mesh_shape(ParallelismConfig(context_parallel_size=2, moe_expert_parallel_size=2), 8)


@pytest.mark.parametrize(("change", "needle"), [
    ({"data": {"seq_length": 6}}, "seq_length divisible by 2 x 2"),
    ({"parallelism": {"pipe_parallel_size": 2}}, "pipe_parallel_size"),
    ({"model": {"attention_dropout": 0.1}}, "attention_dropout"),
    ({"model": {"attention_types": ("mamba",) * 2}}, "Mamba"),
    ({"training": {"train_impl": "dpo"}}, "train_impl 'dpo'"),
    ({"evaluation": {"eval_tasks": ("lambada",)}}, "eval_tasks"),
])
def test_what_context_parallel_cannot_run_is_refused_naming_the_key(change, needle):
    cfg = RunConfig(parallelism=ParallelismConfig(context_parallel_size=2))
    cfg = replace(cfg, data=replace(cfg.data, seq_length=16))
    for section, values in change.items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    with pytest.raises(ConfigError, match=needle):
        check_context_parallel(cfg)


def _torchrun(script: Path, args: list[str], nproc: int, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _check_equal_to_one_process(tmp_path: Path, nproc: int, scenarios: list[str]) -> None:
    out = tmp_path / "cp.json"
    proc = _torchrun(HERE / "cp_worker.py", [str(out), *scenarios], nproc)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in scenarios:
        r = results[name]
        assert "error" not in r, f"{name}:\n{r.get('error')}"
        assert r["local_tokens"] == 32 * (2 if name.endswith(("cptp", "dpcp")) else 1) // nproc, name
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-5), name
        assert r["grad_diff"] <= 1e-5, name


def test_two_cp_ranks_equal_one_process(tmp_path):
    """Ring (LLaMA, GQA, causal) and all-gathered K/V (OLMo-3's sliding-window layers; document masks
    with restarting positions and a loss mask): loss and every gradient as on the whole sequence."""
    _check_equal_to_one_process(tmp_path, 2, ["llama:causal:cp", "llama:docs:cp", "olmo3:causal:cp", "olmo3:docs:cp",
                                              "llama:causal:cpac"])


@pytest.mark.slow
def test_two_cp_ranks_with_compiled_blocks_equal_one_process(tmp_path):
    """torch.compile per block: the ring runs eagerly inside the compiled block (compiler.disable)."""
    _check_equal_to_one_process(tmp_path, 2, ["llama:causal:cpcompile", "olmo3:docs:cpcompile"])


@pytest.mark.slow
def test_four_ranks_cp4_cp2_with_tp2_and_dp2_equal_one_process(tmp_path):
    _check_equal_to_one_process(tmp_path, 4, ["llama:causal:cp", "olmo3:docs:cp", "llama:causal:cptp",
                                              "olmo3:docs:cptp", "llama:causal:dpcp", "olmo3:docs:dpcp"])




def test_neoxt_train_with_context_parallel_follows_one_process_and_resumes(tmp_path, tiny_tokenizer_dir, corpus):
    """`neoxt launch` with context_parallel_size 2 (both ranks read the same batches, each keeps half of
    every sequence) gives the one-process loss and validation curves; its checkpoint continues on one
    process."""
    # Causal layers (the ring) with GQA, positions restarting at each document and EOD masked out of the loss.
    common = {"log_interval": 1, "lr_decay_iters": 6, "padded_vocab_size": 512, "reset_position_ids": True,
              "eod_mask_loss": True, "num_kv_heads": 1, "eval_interval": 2, "eval_iters": 1}
    cfg, run = write_train_config(tmp_path, tiny_tokenizer_dir, corpus, 6, "ref", with_valid=True, **common)
    run_neoxt("train", str(cfg))
    ref = metrics_losses(run)
    cfg, run = write_train_config(tmp_path, tiny_tokenizer_dir, corpus, 6, "cp", True, context_parallel_size=2,
                                  checkpoint_factor=3, **common)
    run_neoxt("launch", str(cfg), "--nproc-per-node", "2", "--set", "train_iters=3")
    assert (run / "latest").read_text().strip() == "global_step3"
    out = run_neoxt("train", str(cfg), "--set", "context_parallel_size=1")
    assert f"resuming from {run / 'global_step3'}" in out
    got = metrics_losses(run)
    assert [got[i] for i in range(1, 7)] == pytest.approx([ref[i] for i in range(1, 7)], abs=1e-5)
    ref_eval, cp_eval = _valid_losses(tmp_path / "ref"), _valid_losses(run)  # validation splits sequences too
    assert len(ref_eval) == 3 and cp_eval == pytest.approx(ref_eval, abs=1e-5)


def _valid_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    return [r["valid_loss"] for r in records if "valid_loss" in r]
