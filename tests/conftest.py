"""Shared fixtures: everything is built in-process (no network, no hub downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# A small English corpus for tokenizer training and tiny pretraining runs.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the tokens before it.",
    "GPT-NeoX trains large autoregressive transformers on many GPUs.",
    "Checkpoints must be written atomically so that a crash never corrupts them.",
    "Rotary position embeddings rotate pairs of query and key dimensions.",
    "The assistant answers the user politely and precisely.",
    "Tokenizers split text into pieces; the model sees only their ids.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers like 12345 and 67890 appear in text as well.",
    "Sliding window attention looks only at the most recent tokens.",
] * 20

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 320, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Train a byte-level BPE on CORPUS and save it as an HF tokenizer directory.

    The directory holds ``tokenizer.json`` (usable as GPT-NeoX's HFTokenizer ``vocab_file``) and the
    files ``AutoTokenizer.from_pretrained`` reads, including the chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|padding|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|padding|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """An HF tokenizer directory (tokenizer.json + chat template), vocab 320: 256 bytes, 6 specials, merges."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(CORPUS)


@pytest.fixture
def corpus_dataset(tmp_path, tiny_tokenizer_dir):
    """CORPUS preprocessed (with EOD) by our own pipeline: (TokenizerConfig, dataset prefix)."""
    import json

    from neoxt.config.schema import TokenizerConfig
    from neoxt.data.tokenize import preprocess

    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in CORPUS))
    tok = TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(tiny_tokenizer_dir / "tokenizer.json"))
    return tok, preprocess([str(src)], str(tmp_path / "corpus"), tok, keys=("text",), append_eod=True).outputs["text"]


def run_neoxt_train(config: dict, config_path: Path, nproc: int = 1, timeout: int = 240):
    """Write ``config`` as YAML and run ``neoxt train`` on it, under torchrun when ``nproc`` > 1.

    Returns the finished process; asserts it exited 0 (its output is the failure message)."""
    import subprocess
    import sys

    import yaml

    config_path.write_text(yaml.safe_dump(config))
    train = ["-m", "neoxt.cli", "train", str(config_path)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, *launcher, *train], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out
