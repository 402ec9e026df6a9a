"""`neoxt demo`: the whole path on a laptop CPU in a couple of minutes.

Shipped corpus → our preprocess (``.bin/.idx``) → ``neoxt train`` with ``configs/demo.yml`` → a
checkpoint → ``neoxt.load_model`` → a generated sample. Every step is the real code path users run;
the demo only supplies paths. Running it again resumes (and finds the run finished) rather than
starting over, as ``neoxt train`` does.

The demo is also the users' install check, so it fails (exit 1) when the loss does not fall by 10%
from its first steps to its last; ``neoxt doctor --train-check`` runs the same check on a smaller
model without needing a checkout (``train_check``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from neoxt.errors import ConfigError

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "corpus"
PROMPT = "Once upon a time,"
MIN_DROP = 0.10  # the loss must fall at least this fraction from the first steps to the last

# `neoxt doctor --train-check`: configs/demo.yml's recipe on a 2-layer model, 100 steps (seconds on CPU).
TRAIN_CHECK: dict = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "seq_length": 32,
    "max_position_embeddings": 32, "pos_emb": "rotary", "rotary_pct": 0.25, "gpt_j_residual": True,
    "init_method": "small_init", "output_layer_init_method": "wang_init", "lr": 3.0e-3, "min_lr": 3.0e-4,
    "lr_decay_style": "cosine", "warmup": 0.05, "train_micro_batch_size_per_gpu": 4, "train_iters": 100,
    "split": "949,50,1", "eval_iters": 0, "seed": 1234, "tokenizer_type": "HFTokenizer",
}


@dataclass(frozen=True)
class LossDrop:
    """Mean loss of the first and of the last ``steps`` finite steps of a run."""

    first: float
    last: float
    steps: int

    @property
    def fell_enough(self) -> bool:
        return self.last <= (1.0 - MIN_DROP) * self.first

    def describe(self) -> str:
        return f"loss {'fell' if self.last < self.first else 'went'} from {self.first:.3f} (first {self.steps} steps) " \
               f"to {self.last:.3f} (last {self.steps} steps)"


def loss_drop(losses: Sequence[float]) -> LossDrop | None:
    """None when fewer than 20 finite steps ran (too few to judge, e.g. a finished run resumed)."""
    finite = [x for x in losses if math.isfinite(x)]
    if len(finite) < 20:
        return None
    k = max(5, len(finite) // 10)
    return LossDrop(sum(finite[:k]) / k, sum(finite[-k:]) / k, k)


def train_check(workdir: str | os.PathLike | None = None) -> LossDrop:
    """Tokenize the shipped corpus and train ``TRAIN_CHECK`` on it (the doctor's training row)."""
    from neoxt.config import config_from_dict
    from neoxt.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        dataset, vocab = prepare_data(work / "data", quiet=True)
        cfg = config_from_dict({**TRAIN_CHECK, "data_path": dataset, "vocab_file": vocab,
                                "index_cache_dir": str(work / "data" / "index-cache")}, source="train check")
        drop = loss_drop(train(cfg, None, log=lambda msg: None).losses)
    if drop is None:
        raise RuntimeError("the training check ran fewer than 20 steps")
    return drop


def _demo_config_path() -> Path:
    candidates = [Path.cwd() / "configs" / "demo.yml", Path(__file__).resolve().parents[3] / "configs" / "demo.yml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"configs/demo.yml not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
                      "run the demo from a neoxt checkout")


def _idle_cores() -> int:
    """Threads for a small CPU model: the cores other processes leave idle (at least 1, at most 8).

    Small matmuls on more threads than free cores spend their time waiting at OpenMP barriers: on
    a busy 2-core machine one thread runs the demo several times faster than two.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(8, cores - int(round(busy))))


def prepare_data(data_dir: Path, quiet: bool = False) -> tuple[str, str]:
    """Tokenize the shipped corpus once; returns (dataset prefix, tokenizer.json path)."""
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.indexed import dataset_exists
    from neoxt.data.tokenize import output_prefix_for, preprocess

    data_dir.mkdir(parents=True, exist_ok=True)
    vocab = data_dir / "tokenizer.json"
    if not vocab.is_file():
        shutil.copyfile(CORPUS_DIR / "tokenizer.json", vocab)
    prefix = str(data_dir / "demo")
    out = output_prefix_for(prefix, "text")
    if not dataset_exists(out):
        t0 = time.time()
        tok = TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(vocab))
        preprocess([str(CORPUS_DIR / "demo_corpus.jsonl")], prefix, tok, keys=("text",), append_eod=True)
        say(f"demo: tokenized the shipped corpus into {out}.bin/.idx ({time.time() - t0:.1f} s)")
    else:
        say(f"demo: using the tokenized corpus in {out}.bin/.idx")
    return out, str(vocab)


def run_demo(workdir: str | os.PathLike, iters: int | None = None) -> int:
    import torch

    from neoxt.config import load_config
    from neoxt.train.loop import train

    started = time.time()
    torch.set_num_threads(_idle_cores())
    work = Path(workdir)
    dataset, vocab = prepare_data(work / "data")
    save = work / "checkpoints"
    overrides = [
        f"data_path={dataset}",
        "split=949,50,1",
        f"vocab_file={vocab}",
        f"save={save}",
        f"index_cache_dir={work / 'data' / 'index-cache'}",
    ]
    if iters is not None:
        overrides += [f"train_iters={iters}", f"checkpoint_factor={iters}", f"lr_decay_iters={iters}"]
    cfg = load_config([str(_demo_config_path())], overrides)
    result = train(cfg, None)

    drop = loss_drop(result.losses)
    if drop is None:
        print("demo: fewer than 20 steps trained in this run, so the loss is not checked", flush=True)
    elif not drop.fell_enough:
        print(f"demo: FAILED: the {drop.describe()}, less than the {MIN_DROP:.0%} drop a working install "
              "gives; run `neoxt doctor --train-check`", flush=True)
        return 1
    else:
        print(f"demo: {drop.describe()}", flush=True)

    import neoxt
    from neoxt.generate import SamplingParams, generate_texts
    from neoxt.tokenizer import load_tokenizer

    model = neoxt.load_model(save)
    tokenizer = load_tokenizer(cfg.tokenizer)
    params = SamplingParams(temperature=0.7, top_k=40, maximum_tokens=60)
    record = generate_texts(model, tokenizer, [PROMPT], params, generator=torch.Generator().manual_seed(0))[0]
    print(f"demo: checkpoint {result.last_checkpoint or neoxt_latest(save)}", flush=True)
    print(f"demo: sample (temperature 0.7, top-k 40):\n\n{PROMPT}{record['text'] or ''}\n", flush=True)
    print(f"demo: done in {time.time() - started:.1f} s", flush=True)
    return 0


def neoxt_latest(save: Path) -> Path | None:
    from neoxt.checkpoint import latest_checkpoint

    return latest_checkpoint(save)
