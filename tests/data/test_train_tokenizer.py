"""``neoxt train-tokenizer``: lossless round trips on held-out text, special tokens at the requested ids,
the other models, upstream's settings, an HF directory with a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neoxt.cli import main
from neoxt.data.train_tokenizer import TokenizerSpec, parse_special, train_tokenizer
from neoxt.errors import DataError
from neoxt.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "src" / "neoxt" / "data" / "corpus" / "demo_corpus.jsonl"
HELD_OUT_EXTRA = [
    "  Two leading spaces, trailing tab\t and a newline\n",
    "Ünïcödé: naïve café — “quotes” ﬁ ligature, full-width ＡＢＣ, emoji 🦊🐇, CJK 東京, Hindi नमस्ते.",
    "Text that looks special: <|endoftext|> inside a sentence, and <|im_start|> too.",
    "",
]


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory):
    lines = DEMO.read_text().splitlines()
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.jsonl").write_text("\n".join(lines[:900]) + "\n")
    held = [json.loads(line)["text"] for line in lines[900:]]
    return d / "train.jsonl", held + HELD_OUT_EXTRA


def test_demo_corpus_round_trip_and_special_ids(tmp_path, split_corpus, capsys):
    train, held_out = split_corpus
    out = tmp_path / "tok"
    rc = main(["train-tokenizer", "--input", str(train), "--output", str(out), "--vocab-size", "600",
               "--special-tokens", "<|endoftext|>=0", "<|padding|>=1", "<|im_start|>=598", "<|im_end|>=599",
               "--hf-dir", str(tmp_path / "hf"), "--chat-tokens", "chatml"])
    assert rc == 0, capsys.readouterr().err
    assert "<|im_end|> = 599" in capsys.readouterr().out
    tok = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(out / "tokenizer.json"))
    assert tok.vocab_size == 600
    for token, wanted in {"<|endoftext|>": 0, "<|padding|>": 1, "<|im_start|>": 598, "<|im_end|>": 599}.items():
        assert tok.token_to_id(token) == wanted
        assert tok.encode(f"a{token}b").count(wanted) == 1  # never split into pieces
    assert tok.eod_id == 0
    for text in held_out:
        assert tok.decode(tok.encode(text)) == text
    # learned merges are real: held-out stories take far fewer tokens than bytes
    story = held_out[0]
    assert len(tok.encode(story)) < len(story.encode()) / 2
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token_id == 1
    rendered = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_special_tokens_are_gpt_neox_s(tmp_path, split_corpus):
    train, _ = split_corpus
    tok = train_tokenizer([str(train)], TokenizerSpec(vocab_size=400))
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|padding|>") == 1
    assert tok.get_vocab_size() == 400


def test_upstream_settings_normalize_with_nfkc(tmp_path, split_corpus):
    train, _ = split_corpus
    rc = main(["train-tokenizer", "--json_input_dir", str(train.parent), "--tokenizer_output_path",
               str(tmp_path / "up.json"), "--vocab_size", "400", "--upstream"])
    assert rc == 0
    saved = json.loads((tmp_path / "up.json").read_text())
    assert saved["normalizer"]["type"] == "NFKC" and saved["pre_tokenizer"]["add_prefix_space"] is True
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "up.json"))
    assert tok.decode(tok.encode("ﬁne").ids).strip() == "fine"  # NFKC: why it is not our default


@pytest.mark.parametrize("model,pre", [("wordpiece", "bert"), ("unigram", "metaspace"), ("wordlevel", "whitespace")])
def test_other_models_train_and_place_specials(split_corpus, model, pre):
    train, _ = split_corpus
    spec = TokenizerSpec(model=model, pre_tokenizer=pre, vocab_size=300,
                         special_tokens=("<|endoftext|>", "<|padding|>=5"))
    tok = train_tokenizer([str(train)], spec)
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|padding|>") == 5
    assert tok.encode("the cat").ids and tok.token_to_id("[UNK]") is not None


def test_bad_requests_are_one_line_errors(tmp_path, split_corpus, capsys):
    train, _ = split_corpus
    with pytest.raises(DataError, match="given twice"):
        parse_special(["<a>", "<a>"])
    with pytest.raises(DataError, match="two tokens"):
        parse_special(["<a>=3", "<b>=3"])
    rc = main(["train-tokenizer", "--input", str(train), "--output", str(tmp_path / "t.json"), "--vocab-size", "300",
               "--special-tokens", "<x>=5000"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "<x>=5000" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    assert main(["train-tokenizer", "--input", str(bad), "--output", str(tmp_path / "b.json")]) == 2
    assert "bad.jsonl:2: missing key 'text'" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "b.json").exists()


def test_parquet_and_text_inputs_are_streamed_together(tmp_path, split_corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, _ = split_corpus
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    pq.write_table(pa.table({"body": texts[:400]}), tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_text("\n".join(texts[400:]))
    from neoxt.data.train_tokenizer import iter_texts

    seen = list(iter_texts([str(tmp_path / "a.parquet")], ["body"]))
    assert seen == texts[:400]
    tok = train_tokenizer([str(tmp_path / "b.txt")], TokenizerSpec(vocab_size=350))
    assert tok.get_vocab_size() == 350
