"""`neoxt demo`: the whole path on a laptop CPU in a couple of minutes.

Shipped corpus → our preprocess (``.bin/.idx``) → ``neoxt train`` with ``configs/demo.yml`` → a
checkpoint → ``neoxt.load_model`` → a generated sample. Every step is the real code path users run;
the demo only supplies paths. Running it again resumes (and finds the run finished) rather than
starting over, as ``neoxt train`` does.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from neoxt.errors import ConfigError

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "corpus"
PROMPT = "Once upon a time,"


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


def prepare_data(data_dir: Path) -> tuple[str, str]:
    """Tokenize the shipped corpus once; returns (dataset prefix, tokenizer.json path)."""
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
        print(f"demo: tokenized the shipped corpus into {out}.bin/.idx ({time.time() - t0:.1f} s)", flush=True)
    else:
        print(f"demo: using the tokenized corpus in {out}.bin/.idx", flush=True)
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

    if len(result.losses) >= 20:
        k = max(5, len(result.losses) // 10)
        first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
        print(f"demo: loss fell from {first:.3f} (first {k} steps) to {last:.3f} (last {k} steps)", flush=True)

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
