"""Shared by the launch tests: a tokenized corpus and a tiny `neoxt train` config writing into ``run/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def run_neoxt(*args: str) -> str:
    """``python -m neoxt.cli ARGS`` from the repo root (one thread); its output, asserting exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "neoxt.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def tokenized_corpus(root: Path, tokenizer_dir: Path, corpus: list[str]) -> tuple[str, str]:
    """(data prefix, vocab file) of ``corpus`` tokenized with the test tokenizer."""
    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.tokenize import preprocess

    tok = TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(tokenizer_dir / "tokenizer.json"))
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus))
    res = preprocess([str(src)], str(root / "docs"), tok, keys=("text",), append_eod=True)
    return res.outputs["text"], tok.vocab_file


def write_train_config(
    root: Path, tokenizer_dir: Path, corpus: list[str], train_iters: int, run_name: str = "run",
    with_valid: bool = False, **extra
) -> tuple[Path, Path]:
    """(config path, run dir): a 1-layer model that trains fast on CPU; checkpoints only at the end.
    ``with_valid``: the corpus is the validation set too (set ``eval_interval`` to use it)."""
    prefix, vocab = tokenized_corpus(root, tokenizer_dir, corpus)
    run = root / run_name
    cfg = root / f"{run_name}.yml"
    d = {
        "num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 16,
        "max_position_embeddings": 32, "pos_emb": "rotary", "norm": "layernorm", "activation": "gelu",
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}}, "train_micro_batch_size_per_gpu": 2,
        "train_iters": train_iters, "precision": "fp32", "seed": 3, "train_data_paths": [prefix],
        "tokenizer_type": "HFTokenizer", "vocab_file": vocab, "save": str(run), "checkpoint_factor": 10**9,
        "eval_interval": 10**9, "log_interval": 1000, "index_cache_dir": str(root / "cache"),
    }
    if with_valid:
        d["valid_data_paths"] = [prefix]
    d.update(extra)
    cfg.write_text(yaml.safe_dump(d))
    return cfg, run


def metrics_losses(run: Path) -> dict[int, float]:
    """iteration -> loss from ``<run>/metrics.jsonl``."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None:
            out[int(rec["iteration"])] = float(rec["loss"])
    return out
