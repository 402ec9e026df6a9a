"""`neoxt train` under torchrun joins the process group once, in ``neoxt.distributed.mesh``, so the
configured collective timeout (``dist_timeout_s``) is the one the group carries (read back from the
group itself and logged by rank 0)."""

from __future__ import annotations

import pytest

from conftest import run_neoxt_train


@pytest.mark.distributed
def test_neoxt_train_under_torchrun_carries_the_configured_timeout(tmp_path, corpus_dataset):
    tok, prefix = corpus_dataset
    cfg = {
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2, "train_iters": 1,
        "data_path": prefix, "split": "100,0,0", "tokenizer_type": "HFTokenizer", "vocab_file": tok.vocab_file,
        "save": str(tmp_path / "run"), "index_cache_dir": str(tmp_path / "cache"),
        "dist_timeout_s": 123,  # not torch's default (1800 s for gloo), so a second initialisation shows
    }
    out = run_neoxt_train(cfg, tmp_path / "run.yml", nproc=2)
    lines = [x for x in out.stdout.splitlines() if "collective timeout" in x]
    assert lines == ["process group: 2 ranks, collective timeout 123 s"], out.stdout
