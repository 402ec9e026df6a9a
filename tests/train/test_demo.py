"""`neoxt demo`: shipped corpus → preprocess → train → checkpoint → load_model → sample."""

from __future__ import annotations

import json

import pytest

from neoxt.checkpoint import latest_checkpoint
from neoxt.cli import main
from neoxt.train.demo import CORPUS_DIR


def test_shipped_corpus_is_small_and_readable():
    corpus = CORPUS_DIR / "demo_corpus.jsonl"
    assert corpus.stat().st_size < 400_000
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert len(docs) >= 500 and all(d.startswith("Once upon a time") for d in docs)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(CORPUS_DIR / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") is not None
    assert tok.decode(tok.encode(docs[0]).ids) == docs[0]


def test_demo_short_run_end_to_end(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--iters", "20"]) == 0
    out = capsys.readouterr().out
    assert "starting from scratch" in out
    assert "demo: loss fell from" in out
    assert "Once upon a time," in out.split("demo: sample")[1]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "global_step20"
    assert (tmp_path / "checkpoints" / "metrics.jsonl").is_file()
    # A second run resumes the finished run instead of starting over.
    assert main(["demo", "--workdir", str(tmp_path), "--iters", "20"]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_demo_fails_when_the_loss_does_not_fall(tmp_path, capsys, monkeypatch):
    """The real demo path with a learning rate too small to learn: exit 1 and say why, no sample."""
    from neoxt.config import with_overrides
    from neoxt.train import loop

    real_train = loop.train

    def flat_train(cfg, *args, **kwargs):
        return real_train(with_overrides(cfg, optimizer={"lr": 1e-9}, schedule={"min_lr": 0.0}), *args, **kwargs)

    monkeypatch.setattr(loop, "train", flat_train)
    assert main(["demo", "--workdir", str(tmp_path), "--iters", "20"]) == 1
    out = capsys.readouterr().out
    assert "demo: FAILED: the loss" in out and "10% drop" in out and "demo: sample" not in out


def test_loss_drop_judges_the_first_and_last_steps():
    from neoxt.train.demo import loss_drop

    assert loss_drop([5.0] * 19) is None
    falling = loss_drop([5.0] * 10 + [4.4] * 10)
    assert falling.steps == 5 and falling.fell_enough
    assert not loss_drop([5.0] * 10 + [4.6] * 10).fell_enough  # 8% is not enough
    assert not loss_drop([5.0] * 10 + [float("nan")] * 3 + [5.0] * 10).fell_enough


@pytest.mark.slow
def test_full_demo_loss_falls(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    first, last = (float(x.split()[0]) for x in out.split("demo: loss fell from ")[1].split(" to ")[:2])
    assert last < 0.5 * first


def test_loss_falls_ten_percent_in_100_iterations_on_shipped_corpus(tmp_path):
    """Acceptance 5 (the users' install check): real tokenizer, preprocess, loader, loop."""
    from neoxt.config import load_config
    from neoxt.train.demo import _demo_config_path, prepare_data
    from neoxt.train.loop import train

    dataset, vocab = prepare_data(tmp_path / "data")
    cfg = load_config([str(_demo_config_path())], [
        f"data_path={dataset}", f"vocab_file={vocab}", "split=949,50,1", "num_layers=2", "hidden_size=64",
        "intermediate_size=128", "seq_length=32", "max_position_embeddings=32", "train_micro_batch_size_per_gpu=4",
        "train_iters=100", "lr_decay_iters=100", "eval_iters=0", f"index_cache_dir={tmp_path / 'cache'}",
    ])
    r = train(cfg, None, log=lambda m: None)
    first, last = sum(r.losses[:10]) / 10, sum(r.losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)
